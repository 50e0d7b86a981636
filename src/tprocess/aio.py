"""Async tasks: an `async def` task runs in one asyncio event loop per worker (uvloop when installed).

A plain group runs `concurrency` loops of `await task(ctx)`; a queue group keeps up to `concurrency`
jobs in flight (queue/async_consumer.py). Either way a stop only ends the loops between calls: every
call in flight runs to its end. The worker's slot shows "busy" while any call runs (the start of the
oldest running one is its TASK_START, so task_timeout counts per call from the master's one stamp)
and "idle" when none does.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .logs import log
from .slots import BUSY, IDLE, TASK_START

if TYPE_CHECKING:
    from .worker import Context, WorkerSpec

STOP_POLL = 0.05  # a stop is also noticed by polling the flag (an event loop may own the wake-up fd)
MAX_ERROR_DELAY = 5.0

_current: contextvars.ContextVar[int | None] = contextvars.ContextVar("tprocess_call", default=None)


def is_async(func: Callable[..., Any]) -> bool:
    """An `async def` task (or a callable object whose __call__ is one)."""
    call = type(func).__call__ if not inspect.isroutine(func) else None  # a callable object
    return inspect.iscoroutinefunction(func) or (call is not None and inspect.iscoroutinefunction(call))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Runner:
    """What every async worker shares: the loop, the stop, the slot's state and counters, recycling."""

    def __init__(self, spec: WorkerSpec, ctx: Context, concurrency: int) -> None:
        self.spec, self.ctx, self.concurrency = spec, ctx, concurrency
        self.loop = new_event_loop()
        self.stop_event = asyncio.Event()
        self.exit_code: int | None = None  # a task raised SystemExit
        self._starts: dict[int, int] = {}  # call token -> CLOCK_MONOTONIC ns it began
        self._next_token = 0
        from .worker import TaskCounter

        self.counter = TaskCounter(spec)  # tasks, errors, durations; max_tasks / max_memory
        self._words, self._start_word = spec.slot.words, spec.slot.base + TASK_START

    # --- running ----------------------------------------------------------------------

    def run(self, main: Callable[[], Coroutine[Any, Any, None]]) -> int:
        """Run main() to its end in the worker's loop; return the worker's exit code."""
        ctx = self.ctx
        ctx._aio = self
        self._publish()  # idle until the first call begins
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.add_reader(ctx._wake_fd, self._on_wake)
            self._poll_stop()
            self.loop.run_until_complete(main())
        finally:
            self.loop.remove_reader(ctx._wake_fd)
            self.loop.close()
            asyncio.set_event_loop(None)
            ctx._aio = None
        return self.finish_code()

    def finish_code(self) -> int:
        from .worker import EXIT_OK

        if self.exit_code is not None:
            return self.exit_code
        return self.counter.exit_code(self.spec, EXIT_OK)

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def stop(self) -> None:
        """No new call starts; the ones in flight finish."""
        if not self.stop_event.is_set():
            self.stop_event.set()
            self.on_stop()

    def on_stop(self) -> None:
        """Subclasses: interrupt what waits (a fetch)."""

    def _on_wake(self) -> None:
        from .worker import drain_pipe

        drain_pipe(self.ctx._wake_fd)
        if self.ctx.stopping:
            self.stop()

    def _poll_stop(self) -> None:
        if self.ctx.stopping:
            self.stop()
        elif not self.loop.is_closed():
            self.loop.call_later(STOP_POLL, self._poll_stop)

    # --- the slot: busy while any call runs --------------------------------------------

    def begin_call(self) -> int:
        token = self._next_token = self._next_token + 1
        self._starts[token] = time.monotonic_ns()
        _current.set(token)
        self._publish()
        return token

    def end_call(self, token: int | None) -> None:
        if token is not None and self._starts.pop(token, None) is not None:
            self._publish()

    def _publish(self) -> None:
        slot = self.spec.slot
        if self._starts:
            self._words[self._start_word] = min(self._starts.values())  # before "busy": never stale
            slot.state = BUSY
        else:
            slot.state = IDLE

    def count(self, ok: bool, began_ns: int) -> None:
        """One call ended: counted; the worker stops once max_tasks / max_memory say so."""
        if self.counter.ended(ok, began_ns):
            self.stop()

    async def sleep(self, seconds: float) -> bool:
        """ctx.asleep: the calling call counts as idle meanwhile; False at once when a stop is asked."""
        if self.stopping:
            return False
        token = _current.get()
        self.end_call(token)
        try:
            await asyncio.wait_for(self.stop_event.wait(), max(0.0, seconds))
            return False
        except TimeoutError:
            return True
        finally:
            if token is not None:
                self._starts[token] = time.monotonic_ns()  # busy again: task_timeout counts from here
                self._publish()


class PlainLoops(Runner):
    """A group without a queue: `concurrency` loops of `await task(ctx)` until a stop."""

    async def main(self) -> None:
        loops = [asyncio.ensure_future(self._forever()) for _ in range(self.concurrency)]
        await asyncio.gather(*loops)

    async def _forever(self) -> None:
        task, ctx = self.spec.task, self.ctx
        errors_in_row = 0
        while not self.stopping:
            token = self.begin_call()
            began = time.monotonic_ns()
            ok = False
            try:
                await task(ctx)
                ok = True
                errors_in_row = 0
            except SystemExit as exc:
                from .worker import _exit_code

                self.exit_code = _exit_code(exc)
                self.stop()
            except BaseException:  # noqa: BLE001 - a failing task must not end the worker
                errors_in_row += 1
                log.exception("task of %s raised", ctx.name)
            finally:
                self.end_call(token)
            self.count(ok, began)
            if not ok and not self.stopping:
                await self.sleep(min(0.05 * 2 ** (errors_in_row - 1), MAX_ERROR_DELAY))


def run_plain(spec: WorkerSpec, ctx: Context, concurrency: int) -> int:
    """The worker's task loop for an `async def task(ctx)`."""
    runner = PlainLoops(spec, ctx, concurrency)
    return runner.run(runner.main)


def block_signals_in_thread() -> None:
    """Threads of an async worker leave signals to the main thread (which runs the handlers)."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGUSR1,
                                              signal.SIGHUP, signal.SIGCHLD})


