"""The consuming loop for an `async def task(ctx, job)`: up to `concurrency` jobs in flight per worker.

The brokers are synchronous, so they run in two threads of their own, each with its own broker
object (a connection is never shared between threads): one fetches (one job at a time, and only
when a place is free: nothing is prefetched), the other acknowledges, retries and dead-letters. A
stop interrupts a waiting fetch at once through a pipe (a job the broker handed over in that instant
is handed back), then every job in flight finishes and is reported before the worker exits.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..aio import Runner, block_signals_in_thread
from ..logs import log
from .consumer import BROKER_ERROR_PAUSE, FETCH_WAIT, MAX_RETRY_DELAY, _failed, _report
from .jobs import BrokerError, Job, Reject
from .urls import open_broker

if TYPE_CHECKING:
    from ..worker import Context, WorkerSpec
    from .serving import JobOptions


class AsyncJobs(Runner):
    def __init__(self, spec: WorkerSpec, ctx: Context, options: JobOptions, consumer: str) -> None:
        super().__init__(spec, ctx, options.concurrency)
        self.options, self.consumer = options, consumer
        self.fetch_broker = open_broker(options.broker_url)
        self.report_broker = open_broker(options.broker_url)
        self.fetcher = ThreadPoolExecutor(1, "fetch", initializer=block_signals_in_thread)
        self.reporter = ThreadPoolExecutor(1, "report", initializer=block_signals_in_thread)
        self.interrupt_r, self.interrupt_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.running: set[asyncio.Future[Any]] = set()
        self.room = asyncio.Event()

    def on_stop(self) -> None:
        try:
            os.write(self.interrupt_w, b"\0")  # a fetch waiting for a job returns at once
        except OSError:
            pass

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self.room.set()
        while not self.stopping:
            await self._wait_for_room()
            if self.stopping:
                break
            job = await self._fetch(loop)
            if job is None:
                continue
            if self.stopping:  # fetched in the same instant as the stop: give it back unstarted
                await loop.run_in_executor(self.fetcher, self._hand_back, job)
                break
            future = asyncio.ensure_future(self._run(job))
            self.running.add(future)
            future.add_done_callback(self._finished)
            if len(self.running) >= self.concurrency:
                self.room.clear()
        if self.running:  # a stop lets every job in flight finish
            await asyncio.gather(*self.running)

    async def _wait_for_room(self) -> None:
        stop = asyncio.ensure_future(self.stop_event.wait())
        room = asyncio.ensure_future(self.room.wait())
        await asyncio.wait({stop, room}, return_when=asyncio.FIRST_COMPLETED)
        for future in (stop, room):
            future.cancel()

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self.running.discard(future)
        self.room.set()

    async def _fetch(self, loop: asyncio.AbstractEventLoop) -> Job | None:
        o = self.options
        try:
            return await loop.run_in_executor(
                self.fetcher, self.fetch_broker.fetch, o.queue, self.consumer, FETCH_WAIT, o.job_timeout,
                self.interrupt_r)
        except BrokerError as exc:  # the broker already retried with backoff: pause, then go on
            log.error("queue %s: %s", o.queue, exc)
            await self.sleep(BROKER_ERROR_PAUSE)
            return None

    def _hand_back(self, job: Job) -> None:
        _report(self.ctx, "hand back", lambda: self.fetch_broker.hand_back(job))

    async def _run(self, job: Job) -> None:
        o, ctx = self.options, self.ctx
        loop = asyncio.get_running_loop()
        token = self.begin_call()
        began = time.monotonic_ns()
        error_text: str | None = None
        reject = False
        try:
            await self.spec.task(ctx, job)
        except SystemExit as exc:  # the task ends its worker: the job counts as a failed attempt
            from ..worker import _exit_code

            self.exit_code = _exit_code(exc)
            error_text = f"the task raised SystemExit({exc.code!r})"
            self.stop()
        except BaseException as exc:  # noqa: BLE001 - a failing job must not end the worker
            error_text, reject = traceback.format_exc(), isinstance(exc, Reject)
        finally:
            self.end_call(token)
        if error_text is None:
            ack = self.report_broker.ack
            await loop.run_in_executor(self.reporter, _report, ctx, "ack", lambda: ack(job))
        else:
            await loop.run_in_executor(self.reporter, _failed, ctx, self.report_broker, job, error_text,
                                       o.max_retries, o.retry_delay, MAX_RETRY_DELAY, reject)
        self.count(error_text is None, began)

    def close(self) -> None:
        self.fetcher.shutdown(wait=True)
        self.reporter.shutdown(wait=True)
        for broker in (self.fetch_broker, self.report_broker):
            try:
                broker.close()
            except BrokerError:
                pass
        os.close(self.interrupt_r)
        os.close(self.interrupt_w)


def run_async_jobs(spec: WorkerSpec, ctx: Context, options: JobOptions, consumer: str) -> int:
    """The worker's loop for an `async def task(ctx, job)`; returns its exit code."""
    runner = AsyncJobs(spec, ctx, options, consumer)
    try:
        return runner.run(runner.main)
    finally:
        runner.close()
