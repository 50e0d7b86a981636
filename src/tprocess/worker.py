"""The worker process: what runs in a child after fork, until it exits.

A worker calls its task again and again. A stop request (SIGTERM, SIGINT or
SIGUSR2 from the master, the terminal or systemd; or the master's death through
PR_SET_PDEATHSIG) only sets a flag: the task in progress always runs to its end,
and `ctx.sleep()` returns early so an idle worker stops at once.
"""

from __future__ import annotations

import _signal
import math
import os
import select
import signal
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import libc, logs, output, proctitle
from .slots import (
    BUCKETS,
    BUSY,
    DURATION_BOUNDS,
    DURATION_SUM,
    ERRORS,
    EXIT_REASON,
    IDLE,
    RECYCLE_MAX_MEMORY,
    RECYCLE_MAX_TASKS,
    STARTING,
    STOPPING,
    TASK_START,
    TASKS,
    WOKE_AT,
    Slot,
)

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    import _socket
    from typing import Any, NoReturn

# Exit codes of a worker; the master counts only failures towards backoff.
EXIT_OK = 0  # planned exit: a stop was asked, or the task raised SystemExit(0)
EXIT_CRASH = 1  # the worker machinery itself failed
EXIT_SETUP_FAILED = 3  # setup(ctx) raised
EXIT_TEARDOWN_FAILED = 4  # teardown(ctx) raised

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)  # meant for the master
MAX_ERROR_DELAY = 5.0
MEMORY_CHECK_NS = 1_000_000_000  # how often (at most) a worker with max_memory reads its RSS
BOUNDS_NS = tuple(int(b * 1e9) for b in DURATION_BOUNDS)


class Context:
    """What a task receives: who it is, whether to stop, and an interruptible sleep."""

    def __init__(self, name: str, group: str, index: int, slot: Slot, wake_fd: int) -> None:
        self.name = name
        self.group = group
        self.index = index
        self.pid = os.getpid()
        self.stopping = False
        self.log = logs.log
        self._slot = slot
        self._wake_fd = wake_fd
        self._poll: select.poll | None = None  # made on first sleep, off the start-up path
        self._master_pid = 0  # set after fork: tells a stop of the master's death apart
        self._aio: Any = None  # the event loop's runner, for an async task (aio.py)

    def sleep(self, seconds: float) -> bool:
        """Sleep, but return False at once when a stop is asked; True after a full sleep."""
        if self.stopping:
            return False
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._wake_fd, select.POLLIN)
        slot = self._slot
        previous, slot.state = slot.state, IDLE  # a sleeping worker is safe to stop
        try:
            deadline = time.monotonic() + seconds
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                if self._poll.poll(math.ceil(remaining * 1000)):
                    drain_pipe(self._wake_fd)
                    if self.stopping:
                        return False
        finally:
            slot.words[slot.base + WOKE_AT] = time.monotonic_ns()  # busy again: task_timeout counts from here
            slot.state = previous

    async def asleep(self, seconds: float) -> bool:
        """ctx.sleep for an `async def` task: other calls go on meanwhile; False at once on a stop."""
        if self._aio is not None:
            return await self._aio.sleep(seconds)
        import asyncio

        await asyncio.sleep(seconds)
        return not self.stopping

    def _request_stop(self, signum: int = 0, frame: Any = None) -> None:
        self.stopping = True
        if self._master_pid and os.getppid() != self._master_pid:
            output.silence()  # the master died: nobody reads our output pipes any more


@dataclass
class WorkerSpec:
    """Everything a freshly forked worker needs to know."""

    title: str
    group: str
    index: int
    task: Callable[[Context], Any]
    setup: Callable[[Context], Any] | None
    teardown: Callable[[Context], Any] | None
    slot: Slot
    report: _socket.socket
    master_pid: int
    output: output.Pipes | None = None  # their write ends become fd 1 and 2
    max_tasks: int = 0  # recycle after this many tasks (0: never)
    max_memory: int = 0  # recycle once the RSS is past this many bytes (0: never)
    histogram: bool = False  # count task durations (metrics are on)
    jobs: Any = None  # queue.serving.JobOptions: the task runs once per job of this queue
    concurrency: int = 1  # async tasks: jobs in flight, or loops, at once
    ready_fd: int = -1  # the master's ready pipe


def jobs_of(config: Any, group: Any) -> Any:
    """The job options of a group with a queue (None without): imports the queue package only then."""
    if not getattr(group, "queue", None):
        return None
    from .queue.serving import job_options

    return job_options(config, group)


def run(spec: WorkerSpec, master_fds: Iterable[tuple[int, int]]) -> NoReturn:
    """Entry point in the child right after fork: never returns."""
    code = EXIT_CRASH
    try:
        ctx = _become_worker(spec, master_fds)
        code = _serve(spec, ctx)
    except BaseException:  # noqa: BLE001 - a worker must never return into master code
        logs.log.exception("worker %s failed", spec.title)
    finally:
        _exit(code, spec.master_pid)


def _become_worker(spec: WorkerSpec, master_fds: Iterable[tuple[int, int]]) -> Context:
    proctitle.setproctitle(spec.title)  # first: until then the child is titled as the master
    logs.set_title(spec.title)
    if spec.output is not None:
        output.become_writer(spec.output)
    _close_fds(master_fds)  # before any descriptor of ours: the runs may cover free numbers
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    output.restore_fd_limit()
    ctx = Context(spec.title, spec.group, spec.index, spec.slot, wake_r)
    ctx._master_pid = spec.master_pid
    # _signal is the C module behind `signal`: its wrappers' enum conversions touch
    # enough of the master's memory to add ~0.3 ms of copy-on-write faults per respawn
    for sig in STOP_SIGNALS:
        _signal.signal(sig, ctx._request_stop)
    for sig in IGNORED_SIGNALS:
        _signal.signal(sig, _signal.SIG_IGN)
    _signal.signal(signal.SIGCHLD, _signal.SIG_DFL)
    _signal.signal(signal.SIGQUIT, _signal.SIG_DFL)
    # SIGUSR1 reopens the master's log: a stray one (a rotation script signalling every
    # process of the instance) must not kill a worker. A no-op handler rather than
    # SIG_IGN, so that programs a task execs get the default action back.
    _signal.signal(signal.SIGUSR1, _ignore_signal)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    libc.set_death_signal(signal.SIGTERM)  # the master's death asks for a stop
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())  # the master blocked all around fork
    if os.getppid() != spec.master_pid:  # the master died before prctl took effect
        ctx._request_stop()
    spec.slot.state = STARTING
    return ctx


def _serve(spec: WorkerSpec, ctx: Context) -> int:
    if spec.setup is not None:
        try:
            spec.setup(ctx)
        except BaseException as exc:  # noqa: BLE001 - user code
            if _is_clean_exit(exc):
                return EXIT_OK
            import traceback  # not on the start path: ~2 ms and 0.1 MiB in every worker

            text = traceback.format_exc()
            logs.log.error("setup of %s failed:\n%s", spec.title, text.rstrip())
            _report(spec, b"E %d\n" % ctx.pid + text.encode(errors="replace")[-60000:])
            return EXIT_SETUP_FAILED
    # past setup and not yet in a task: idle, before the master learns it is ready, so that
    # `status` never shows a ready worker as starting (a roll would seem one worker short)
    spec.slot.state = IDLE
    _report_ready(spec, ctx.pid)
    if spec.jobs is not None:  # a queue group: task(ctx, job) once per job
        from .queue.serving import serve_jobs

        code = serve_jobs(spec, ctx, spec.jobs)
    elif _is_async(spec.task):
        from .aio import run_plain

        code = run_plain(spec, ctx, spec.concurrency)
    elif spec.max_tasks or spec.max_memory or spec.histogram:
        code = _guarded_loop(spec, ctx)
    else:
        code = _loop(spec.task, ctx, spec.slot)
    spec.slot.state = STOPPING
    if spec.teardown is not None:
        try:
            spec.teardown(ctx)
        except BaseException:  # noqa: BLE001 - user code
            logs.log.exception("teardown of %s failed", spec.title)
            code = code or EXIT_TEARDOWN_FAILED
    return code


def _is_async(task: Callable[..., Any]) -> bool:
    code = getattr(task, "__code__", None)  # a plain function: no import of inspect on the hot path
    if code is not None and not code.co_flags & 0x180:  # CO_COROUTINE | CO_ITERABLE_COROUTINE
        return False
    from .aio import is_async

    return is_async(task)


def _loop(task: Callable[[Context], Any], ctx: Context, slot: Slot) -> int:
    """The per-task hot path: one call and one store per task.

    The slot reads "busy" from here on, except while the task waits in ctx.sleep,
    which marks it idle: idle means safe to stop, busy means a task would be cut.
    """
    errors_in_row = 0
    words, tasks_word, errors_word = slot.words, slot.base + TASKS, slot.base + ERRORS
    start_word = slot.base + TASK_START
    clock = time.monotonic_ns
    words[start_word] = clock()  # before "busy": the master must never see busy with a stale stamp
    slot.state = BUSY
    while not ctx.stopping:
        words[start_word] = clock()
        try:
            task(ctx)
        except SystemExit as exc:
            return _exit_code(exc)
        except BaseException:  # noqa: BLE001 - a failing task must not end the worker
            errors_in_row = _task_failed(ctx, words, errors_word, errors_in_row)
            continue
        words[tasks_word] += 1
        errors_in_row = 0
    return EXIT_OK


def _task_failed(ctx: Context, words: memoryview, errors_word: int, errors_in_row: int) -> int:
    """Count and log a task's exception, then pause, longer each time in a row; the new count."""
    words[errors_word] += 1
    errors_in_row += 1
    logs.log.exception("task of %s raised", ctx.name)
    ctx.sleep(min(0.05 * 2 ** (errors_in_row - 1), MAX_ERROR_DELAY))
    return errors_in_row


def _guarded_loop(spec: WorkerSpec, ctx: Context) -> int:
    """The task loop with recycling (max_tasks, max_memory) and duration counts: the
    same as _loop plus a few comparisons per task."""
    task, slot = spec.task, spec.slot
    words, base = slot.words, slot.base
    tasks_word, errors_word, start_word = base + TASKS, base + ERRORS, base + TASK_START
    clock = time.monotonic_ns
    histogram = spec.histogram
    sum_word, buckets = base + DURATION_SUM, base + BUCKETS
    recycling = Recycling(spec.max_tasks, spec.max_memory)
    recycle_on = bool(spec.max_tasks or spec.max_memory)
    errors_in_row = 0
    words[start_word] = clock()
    slot.state = BUSY
    while not ctx.stopping:
        began = words[start_word] = clock()
        try:
            task(ctx)
            words[tasks_word] += 1
            errors_in_row = 0
        except SystemExit as exc:
            return _exit_code(exc)
        except BaseException:  # noqa: BLE001 - a failing task must not end the worker
            errors_in_row = _task_failed(ctx, words, errors_word, errors_in_row)
        ended = clock()
        if histogram:  # inline: a call per task would double the cost of counting
            took = ended - began
            words[sum_word] += took
            words[buckets + bisect_left(BOUNDS_NS, took)] += 1
        if recycle_on and (why := recycling.due(ended)) is not None:
            return _recycle(spec, *why)
    return EXIT_OK


class Recycling:
    """max_tasks and max_memory: whether a worker should end itself after a task (or a job)."""

    __slots__ = ("max_tasks", "max_memory", "unit", "done", "next_memory_check")

    def __init__(self, max_tasks: int, max_memory: int, unit: str = "tasks") -> None:
        self.max_tasks, self.max_memory, self.unit = max_tasks, max_memory, unit
        self.done = 0
        self.next_memory_check = 0

    def due(self, ended_ns: int) -> tuple[int, str] | None:
        """Count one more task ended at ended_ns; the reason to recycle now, if any."""
        self.done += 1
        if self.max_tasks and self.done >= self.max_tasks:
            return RECYCLE_MAX_TASKS, f"after {self.done} {self.unit} (max_tasks)"
        if self.max_memory and ended_ns >= self.next_memory_check:
            self.next_memory_check = ended_ns + MEMORY_CHECK_NS  # RSS read at most once a second
            rss = _resident_bytes()
            if rss > self.max_memory:
                return RECYCLE_MAX_MEMORY, (f"with {rss / 2**20:.1f} MiB resident, "
                                            f"past max_memory {self.max_memory / 2**20:.1f} MiB")
        return None


class TaskCounter:
    """A task, job or async call ended: the slot's tasks or errors word, the duration histogram
    (metrics on), and max_tasks / max_memory, whose recycle reason is kept from the first time.
    (The plain task loops count inline instead: they are the hot path.)"""

    __slots__ = ("words", "base", "histogram", "recycling", "recycle")

    def __init__(self, spec: WorkerSpec, unit: str = "tasks") -> None:
        self.words, self.base = spec.slot.words, spec.slot.base
        self.histogram = spec.histogram
        self.recycling = Recycling(spec.max_tasks, spec.max_memory, unit)
        self.recycle: tuple[int, str] | None = None

    def ended(self, ok: bool, began_ns: int) -> bool:
        """Count one; True the first time the worker is due to recycle itself."""
        words, base = self.words, self.base
        words[base + (TASKS if ok else ERRORS)] += 1
        ended = time.monotonic_ns()
        if self.histogram:
            _count_duration(words, base, ended - began_ns)
        if self.recycle is not None:
            return False
        self.recycle = self.recycling.due(ended)
        return self.recycle is not None

    def exit_code(self, spec: WorkerSpec, code: int) -> int:
        """A planned exit after a recycle is noted in the slot, for the master's restart reason."""
        if code == EXIT_OK and self.recycle is not None:
            return _recycle(spec, *self.recycle)
        return code


def _count_duration(words: memoryview, base: int, took: int) -> None:
    """One task's duration into the slot's histogram (bucket i: took <= bound i; last: +Inf)."""
    words[base + DURATION_SUM] += took
    words[base + BUCKETS + bisect_left(BOUNDS_NS, took)] += 1


def _recycle(spec: WorkerSpec, reason: int, why: str) -> int:
    logs.log.info("%s recycles itself %s", spec.title, why)
    spec.slot.words[spec.slot.base + EXIT_REASON] = reason
    return EXIT_OK


_statm_fd = -1


def _resident_bytes() -> int:
    global _statm_fd
    if _statm_fd < 0:
        _statm_fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    return int(os.pread(_statm_fd, 128, 0).split()[1]) * _PAGE_SIZE


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    logs.log.error("task exited: %s", exc.code)
    return EXIT_CRASH


def _is_clean_exit(exc: BaseException) -> bool:
    return isinstance(exc, SystemExit) and _exit_code(exc) == EXIT_OK


def _report(spec: WorkerSpec, message: bytes) -> None:
    try:
        spec.report.send(message)
    except OSError:
        pass  # the master is gone; PR_SET_PDEATHSIG has asked us to stop


def _report_ready(spec: WorkerSpec, pid: int) -> None:
    """"R PID" on the ready pipe: a few bytes, written at once (a datagram queue holds ~280
    of them; a full one blocked the rest of 2,000 starting workers until the master read)."""
    try:
        os.write(spec.ready_fd, b"R %d\n" % pid)  # under PIPE_BUF: never mixed with another's
    except OSError:
        pass  # the master is gone; PR_SET_PDEATHSIG has asked us to stop


def _terminate_own_children() -> None:
    """Pass the stop on to processes the task started; the master reaps what is left."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(p) for p in fh.read().split()]
    except OSError:
        return
    for child in children:
        try:
            os.kill(child, signal.SIGTERM)
        except OSError:
            pass


def _ignore_signal(signum: int, frame: Any) -> None:
    pass


def _close_fds(runs: Iterable[tuple[int, int]]) -> None:
    """Close the master's descriptors, given as runs [lo, hi) of consecutive numbers
    (one close_range call per run): its own, and the pipes of the other workers of the
    spawn batch (the master holds those only until the batch is forked)."""
    for lo, hi in runs:
        os.closerange(lo, hi)


def drain_pipe(fd: int) -> None:
    """Empty a wake-up pipe (a byte per signal; the master's and each worker's). A short read
    means empty: no read that raises BlockingIOError, whose first raise after a fork copies
    ~14 of the master's pages (the exception machinery): at every stop of every worker, and
    on the master's respawn path (issue 8)."""
    try:
        while len(os.read(fd, 512)) == 512:
            pass
    except BlockingIOError:
        pass


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _exit(code: int, master_pid: int = 0) -> NoReturn:
    if master_pid and os.getppid() != master_pid:
        # the master is gone: nobody will adopt what the task started, so pass the stop on
        _terminate_own_children()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not block the exit
            pass
    os._exit(code)
