"""Benchmark workload, shared by every contestant.

As a tprocess / floor task:  ``bench/workload.py:task`` (called with a ``ctx``).
As a script for the exec-based peers (supervisord, circus, PM2):
``python bench/workload.py`` runs its own loop ``while not stopping: task(ctx)``
and finishes the current task on SIGTERM/SIGINT, then exits.

Environment:
  BENCH_RECORDS  file to append records to (O_APPEND, one os.write per line):
                   ``S <pid> <monotonic_ns>``  task start
                   ``E <pid> <monotonic_ns>``  task end
                   ``C <pid> <calls> <ns>``    empty mode: <calls> tasks took <ns> (best window)
  BENCH_MODE     idle  -> ctx.sleep(0.5) (interruptible)
                 busy  -> 2 s of work that must not be cut (uninterruptible sleep)
                 empty -> no work and no records per call (loop overhead);
                          after a warm-up, times 5 windows of >= 0.2 s and reports
                          the fastest once via a C record
"""

import os
import select
import signal
import time

MODE = os.environ.get("BENCH_MODE", "idle")
IDLE_S = 0.5
BUSY_S = 2.0
WARM = 1000  # empty mode: calls before the first timed window opens
WINDOW_NS = 200_000_000  # empty mode: each timed window lasts at least 0.2 s
WINDOWS = 5  # empty mode: report the best of this many windows (least disturbed)

_fd = -1
_n = 0
_chk = 1
_t0 = 0
_base = 0
_best = None  # (calls, ns) of the fastest window so far
_windows = 0


def _write(line):
    global _fd
    if _fd < 0:
        _fd = os.open(os.environ["BENCH_RECORDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, line.encode())


def _rec(kind):
    _write(f"{kind} {os.getpid()} {time.monotonic_ns()}\n")


def _checkpoint():
    # Called only at calls 1, WARM, then base+1024, base+2048, base+4096, ... so the
    # clock is read a few dozen times per window: the window times the bare loop.
    global _chk, _t0, _base, _best, _windows
    if _n == 1:
        _rec("S")
        _chk = WARM
        return
    now = time.monotonic_ns()
    if _n != WARM:
        dt = now - _t0
        if dt < WINDOW_NS:
            _chk = _base + 2 * (_chk - _base)
            return
        calls = _n - _base
        if _best is None or calls * _best[1] > _best[0] * dt:
            _best = (calls, dt)
        _windows += 1
        if _windows >= WINDOWS:
            _write(f"C {os.getpid()} {_best[0]} {_best[1]}\n")
            _chk = -1  # never again
            return
    _t0, _base, _chk = now, _n, _n + 1024


if MODE == "empty":

    def task(ctx):
        global _n
        _n += 1
        if _n == _chk:
            _checkpoint()

elif MODE == "busy":

    def task(ctx):
        _rec("S")
        time.sleep(BUSY_S)  # PEP 475: a signal handler that returns does not cut this
        _rec("E")

else:

    def task(ctx):
        _rec("S")
        ctx.sleep(IDLE_S)
        _rec("E")


class ScriptCtx:
    """The exec'd script's own context: interruptible sleep via a wakeup pipe."""

    def __init__(self):
        self.stopping = False
        self._r, w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.stopping = True

    def sleep(self, seconds):
        end = time.monotonic() + seconds
        while not self.stopping:
            left = end - time.monotonic()
            if left <= 0:
                return True
            select.select([self._r], [], [], left)
            try:
                os.read(self._r, 512)
            except BlockingIOError:
                pass
        return False


def main():
    ctx = ScriptCtx()
    while not ctx.stopping:
        task(ctx)


if __name__ == "__main__":
    main()
