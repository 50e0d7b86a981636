"""Tasks for bench/ops.py (run as `bench/ops_tasks.py:NAME` by tprocess).

- `idle`: an idle worker, as in the main benchmark: waits in ctx.sleep(0.5), again and again.
- `slow_setup`: a setup that takes 0.1 s (say, opening a connection): stretches a reload's roll.
- `empty`: a task that does nothing but count its calls, to time the worker's own loop.
  After WARM calls it times windows of at least WINDOW_NS, reading the clock only at
  doubling call counts, and appends one line per window, `W <pid> <calls> <ns>`, to
  $OPS_RECORDS (one os.write on an O_APPEND fd). A line per window, not a best-of-N at
  the end, because a worker with max_tasks is recycled after 1,000,000 calls at most:
  its successor, forked afresh from the master, starts counting again.
"""

import os
import time

WARM = 1000
WINDOW_NS = 100_000_000

_calls = 0
_check_at = WARM
_window_start = 0
_window_base = 0
_fd = -1


def idle(ctx):
    ctx.sleep(0.5)


def slow_setup(ctx):
    time.sleep(0.1)


def empty(ctx):
    global _calls
    _calls += 1
    if _calls == _check_at:
        _checkpoint()


def _checkpoint():
    global _check_at, _window_start, _window_base
    now = time.monotonic_ns()
    if _calls != WARM:
        took = now - _window_start
        if took < WINDOW_NS:
            _check_at = _window_base + 2 * (_check_at - _window_base)
            return
        _record(f"W {os.getpid()} {_calls - _window_base} {took}\n")
        now = time.monotonic_ns()  # the write is not part of the next window
    _window_start, _window_base, _check_at = now, _calls, _calls + 1024


def _record(line):
    global _fd
    if _fd < 0:
        _fd = os.open(os.environ["OPS_RECORDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, line.encode())
