"""The consuming loop for an `async def task(ctx, job)`: up to `concurrency` jobs in flight per worker.

The brokers are synchronous, so they run in two threads of their own, each with its own broker
object (a connection is never shared between threads). The fetch thread asks for as many jobs as
there are free places (up to MAX_BATCH) in one round trip, sending with it the acknowledgements of
the jobs done since the last one; nothing is prefetched beyond the free places, so every job fetched
starts at once. The report thread retries and dead-letters failed jobs, and acknowledges done jobs
when the fetch is waiting on an empty queue (ACK_HOLD after they finished): an acknowledgement is
never held by a wait for jobs. A stop interrupts a waiting fetch at once through a pipe (jobs the
broker handed over in that instant are handed back), then every job in flight finishes and every
acknowledgement is sent before the worker exits.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..aio import Runner, block_signals_in_thread
from ..logs import log
from .consumer import (
    BROKER_ERROR_PAUSE,
    FETCH_WAIT,
    MAX_BATCH,
    MAX_RETRY_DELAY,
    _failed,
    _report,
    failure_of,
)
from .jobs import BrokerError, Job
from .urls import open_broker

if TYPE_CHECKING:
    from ..worker import Context, WorkerSpec
    from .serving import JobOptions

ACK_HOLD = 0.005  # seconds a done job's ack may wait for the next fetch before it is sent on its own


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
        self.done: list[Job] = []  # done jobs whose ack is not sent yet
        self.fetches = 0  # fetches made: tells a held ack whether the fetch it waits for is the same
        self.fetching = False
        self.flush_task: asyncio.Future[None] | None = None  # acks being sent by the report thread

    def on_stop(self) -> None:
        try:
            os.write(self.interrupt_w, b"\0")  # a fetch waiting for a job returns at once
        except OSError:
            pass

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self.room.set()
        try:
            while not self.stopping:
                await self._wait_for_room()
                if self.stopping:
                    break
                jobs = await self._fetch(loop, self.concurrency - len(self.running))
                if self.stopping and jobs:  # fetched in the same instant as the stop: back unstarted
                    await loop.run_in_executor(self.fetcher, self._hand_back, jobs)
                    break
                for job in jobs:
                    future = asyncio.ensure_future(self._run(job))
                    self.running.add(future)
                    future.add_done_callback(self._finished)
                if len(self.running) >= self.concurrency:
                    self.room.clear()
        finally:  # even if a fetch failed unexpectedly: finish what runs, send every ack held
            if self.running:  # a stop lets every job in flight finish
                await asyncio.gather(*self.running)
            if self.flush_task is not None:
                await self.flush_task
            await self._flush()

    async def _wait_for_room(self) -> None:
        stop = asyncio.ensure_future(self.stop_event.wait())
        room = asyncio.ensure_future(self.room.wait())
        await asyncio.wait({stop, room}, return_when=asyncio.FIRST_COMPLETED)
        for future in (stop, room):
            future.cancel()

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self.running.discard(future)
        self.room.set()

    async def _fetch(self, loop: asyncio.AbstractEventLoop, free: int) -> list[Job]:
        """Up to `free` jobs, with the acks of the jobs done so far in the same round trip."""
        o = self.options
        acks, self.done = self.done, []
        self.fetches += 1
        self.fetching = True
        try:
            return await loop.run_in_executor(
                self.fetcher, self.fetch_broker.fetch_many, o.queue, self.consumer, min(free, MAX_BATCH),
                FETCH_WAIT, o.job_timeout, self.interrupt_r, acks)
        except BrokerError as exc:  # the broker already retried with backoff: pause, then go on
            log.error("queue %s: %s", o.queue, exc)
            await self.sleep(BROKER_ERROR_PAUSE)
            return []
        finally:
            self.fetching = False
            self.done[:0] = acks  # not sent (a broker error, a wake-up): they go with the next one

    def _hand_back(self, jobs: list[Job]) -> None:
        _report(self.ctx, "hand back", lambda: self.fetch_broker.hand_back_many(jobs))

    def _acknowledge(self, job: Job) -> None:
        """A done job: its ack goes with the next fetch, or on its own if the fetch waits for jobs."""
        self.done.append(job)
        if self.fetching:
            asyncio.get_running_loop().call_later(ACK_HOLD, self._flush_if_fetch_waits, self.fetches)

    def _flush_if_fetch_waits(self, fetch: int) -> None:
        if self.fetching and self.fetches == fetch and self.done and self.flush_task is None:
            self.flush_task = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        """Send the held acks through the report thread, one round trip per batch, until none is left."""
        loop = asyncio.get_running_loop()
        try:
            while self.done:
                acks, self.done = self.done, []
                await loop.run_in_executor(self.reporter, _report, self.ctx, "acknowledge",
                                           lambda acks=acks: self.report_broker.ack_many(acks))
        finally:
            self.flush_task = None

    async def _run(self, job: Job) -> None:
        o, ctx = self.options, self.ctx
        loop = asyncio.get_running_loop()
        token = self.begin_call()
        began = time.monotonic_ns()
        error_text: str | None = None
        reject = False
        try:
            await self.spec.task(ctx, job)
        except BaseException as exc:  # noqa: BLE001 - a failing job must not end the worker
            exit_code, error_text, reject = failure_of(exc)
            if exit_code is not None:  # SystemExit: the worker ends once the calls in flight do
                self.exit_code = exit_code
                self.stop()
        finally:
            self.end_call(token)
        if error_text is None:
            self._acknowledge(job)
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
