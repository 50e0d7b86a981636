"""The consuming loop of a job worker: fetch, run the task, acknowledge, retry or dead-letter.

The worker (worker.py) calls `run_jobs` instead of its plain task loop when its group has a queue.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from .acks import HeldAcks
from .broker import Broker
from .jobs import BrokerError, Job, Reject, consumer_name
from .urls import open_broker
from .waiting import drain_fd, wait_for_fds

FETCH_WAIT = 30.0  # one fetch waits this long at most (a stop interrupts it at once)
MAX_RETRY_DELAY = 300.0
BROKER_ERROR_PAUSE = 1.0  # after a broker error that outlasted the broker's own retries
MAX_BATCH = 64  # jobs fetched per round trip at most
BATCH_WORK = 0.02  # seconds of measured work a batch may hold: a stop or a SIGKILL costs little
LEASE_SHARE = 0.1  # a batch holds at most this share of job_timeout: every job starts well within it


def retry_delay_for(attempt: int, retry_delay: float, max_retry_delay: float = MAX_RETRY_DELAY) -> float:
    """The pause before the next delivery of a job whose attempt `attempt` failed: doubling, capped."""
    return min(retry_delay * 2 ** max(0, attempt - 1), max_retry_delay)


class BatchSize:
    """How many jobs to fetch per round trip: 1 at first, doubling while jobs finish fast, never more
    than BATCH_WORK (or a LEASE_SHARE of job_timeout) of work at the measured time per job. A job's
    lease starts at its fetch, so the last job of a batch must start well within job_timeout."""

    def __init__(self, job_timeout: float) -> None:
        self.budget = min(BATCH_WORK, job_timeout * LEASE_SHARE)
        self.size = 1
        self.per_job: float | None = None  # seconds: rises at once with a slow job, falls slowly

    def record(self, seconds: float) -> None:
        est = self.per_job
        self.per_job = seconds if est is None or seconds > est else est + (seconds - est) * 0.2

    def next(self, most: int = MAX_BATCH) -> int:
        """The size of the next fetch (called once per fetch, so the size doubles per batch)."""
        if self.per_job is None:
            return 1
        fits = int(self.budget / self.per_job) if self.per_job > 0 else MAX_BATCH
        self.size = max(1, min(self.size * 2, fits, MAX_BATCH))
        return max(1, min(self.size, most))


def run_jobs(task: Callable[[Any, Job], Any], ctx: Any, broker: Broker, queue: str, job_timeout: float,
             max_retries: int, retry_delay: float, wake_fd: int, *,
             max_retry_delay: float = MAX_RETRY_DELAY, consumer: str | None = None,
             on_state: Callable[[str], None] | None = None,
             jobs_left: Callable[[], int] | None = None) -> int:
    """Run `task(ctx, job)` for each job of `queue` until `ctx.stopping`; return the worker's exit code.

    A return acknowledges the job; an exception retries it after `retry_delay` doubling per attempt
    (capped at `max_retry_delay`) until `max_retries` retries were made, then dead-letters it with its
    traceback; `Reject` dead-letters at once. Jobs are fetched in small batches (BatchSize) and the
    acknowledgements of finished jobs go with the next fetch, in the same round trip; they are never
    held across a wait for jobs nor past the loop's end, nor for long while a later job of the batch
    runs (acks.HeldAcks sends them after MAX_HOLD). A stop never cuts a job: the loop checks
    `ctx.stopping` only between jobs, and the batch's unstarted jobs are handed back at once.
    `on_state("idle" | "busy")` lets the worker show whether it waits for a job or runs one;
    `jobs_left()` caps a fetch (max_tasks: no job is prefetched only to be handed back).
    """
    who = consumer or consumer_name(ctx.name, getattr(ctx, "instance", None))
    sizer = BatchSize(job_timeout)
    batch: deque[Job] = deque()  # fetched, not started
    held = HeldAcks(lambda: open_broker(broker.url), ctx.log)  # finished, not yet acknowledged
    fetched_at = 0.0
    try:
        while not ctx.stopping:
            if not batch:
                _set(on_state, "idle")
                most = jobs_left() if jobs_left is not None else MAX_BATCH
                acks = held.take()
                try:
                    batch.extend(broker.fetch_many(queue, who, sizer.next(most), FETCH_WAIT, job_timeout,
                                                   wake_fd, acks))
                except BrokerError as exc:  # the broker already retried with backoff: pause, then go on
                    ctx.log.error("queue %s: %s", queue, exc)
                    _pause(wake_fd, BROKER_ERROR_PAUSE)
                    continue
                finally:
                    held.give_back(acks)
                fetched_at = time.monotonic()
                if not batch:
                    drain_fd(wake_fd)  # woken by a signal: the loop condition decides
                continue  # a stop that came with the jobs hands them back unstarted
            if time.monotonic() - fetched_at > job_timeout / 2:  # a slow job ate the batch's lease
                _hand_back(ctx, broker, batch)
                continue
            job = batch.popleft()
            held.job_starts()
            _set(on_state, "busy")
            began = time.monotonic()
            code, ok = _run_one(task, ctx, broker, job, max_retries, retry_delay, max_retry_delay)
            sizer.record(time.monotonic() - began)
            if ok:
                held.add(job)
            if code is not None:
                return code
        return 0
    finally:
        _hand_back(ctx, broker, batch)
        held.close()
        acks = held.take()
        _report(ctx, "acknowledge", lambda: broker.ack_many(acks))


def _hand_back(ctx: Any, broker: Broker, batch: deque[Job]) -> None:
    if batch:
        jobs = list(batch)
        batch.clear()
        _report(ctx, "hand back", lambda: broker.hand_back_many(jobs))


def _run_one(task: Callable[[Any, Job], Any], ctx: Any, broker: Broker, job: Job, max_retries: int,
             retry_delay: float, max_retry_delay: float) -> tuple[int | None, bool]:
    """One job; a failure reported to the broker at once (a success is acknowledged by the caller).
    Returns (an exit code if the task asked to exit, whether it succeeded)."""
    try:
        task(ctx, job)
    except BaseException as exc:  # noqa: BLE001 - a failing job must not end the worker
        exit_code, error_text, reject = failure_of(exc)
        _failed(ctx, broker, job, error_text, max_retries, retry_delay, max_retry_delay, reject)
        return exit_code, False
    return None, True


def failure_of(exc: BaseException) -> tuple[int | None, str, bool]:
    """What a job's exception means, for the sync and the async consumer alike: (the worker's exit
    code if the task asked to end it, the error text the broker keeps, whether the job is
    dead-lettered at once). Called in the `except` block (the traceback is the current one)."""
    if isinstance(exc, SystemExit):  # the task ends its worker: the job counts as a failed attempt
        from ..worker import _exit_code

        return _exit_code(exc), f"the task raised SystemExit({exc.code!r})", False
    return None, traceback.format_exc(), isinstance(exc, Reject)


def _failed(ctx: Any, broker: Broker, job: Job, error_text: str, max_retries: int, retry_delay: float,
            max_retry_delay: float, reject: bool) -> None:
    if reject or job.attempt > max_retries:
        why = "rejected" if reject else f"failed on attempt {job.attempt}, no retries left"
        ctx.log.error("job %s of queue %s %s: dead-lettered\n%s", job.id, job.queue, why, error_text.rstrip())
        _report(ctx, "dead-letter", lambda: broker.dead(job, error_text))
        return
    delay = retry_delay_for(job.attempt, retry_delay, max_retry_delay)
    ctx.log.error("job %s of queue %s failed on attempt %d: retry in %.3g s\n%s", job.id, job.queue,
                  job.attempt, delay, error_text.rstrip())
    _report(ctx, "retry", lambda: broker.retry(job, delay, error_text))


def _report(ctx: Any, what: str, call: Callable[[], None]) -> None:
    """Tell the broker jobs' outcome; if it cannot be told, the jobs come back after job_timeout."""
    try:
        call()
    except BrokerError as exc:
        ctx.log.error("could not %s jobs, they will be delivered again: %s", what, exc)


def _pause(wake_fd: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if wait_for_fds([wake_fd], left):
            return


def _set(on_state: Callable[[str], None] | None, state: str) -> None:
    if on_state is not None:
        on_state(state)
