"""The consuming loop of a job worker: fetch, run the task, acknowledge, retry or dead-letter.

The worker (worker.py) calls `run_jobs` instead of its plain task loop when its group has a queue.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from .broker import Broker
from .jobs import BrokerError, Job, Reject, consumer_name
from .waiting import drain_fd, wait_for_fds

FETCH_WAIT = 30.0  # one fetch waits this long at most (a stop interrupts it at once)
MAX_RETRY_DELAY = 300.0
BROKER_ERROR_PAUSE = 1.0  # after a broker error that outlasted the broker's own retries


def retry_delay_for(attempt: int, retry_delay: float, max_retry_delay: float = MAX_RETRY_DELAY) -> float:
    """The pause before the next delivery of a job whose attempt `attempt` failed: doubling, capped."""
    return min(retry_delay * 2 ** max(0, attempt - 1), max_retry_delay)


def run_jobs(task: Callable[[Any, Job], Any], ctx: Any, broker: Broker, queue: str, job_timeout: float,
             max_retries: int, retry_delay: float, wake_fd: int, *,
             max_retry_delay: float = MAX_RETRY_DELAY, consumer: str | None = None,
             on_state: Callable[[str], None] | None = None) -> int:
    """Run `task(ctx, job)` for each job of `queue` until `ctx.stopping`; return the worker's exit code.

    A return acknowledges the job; an exception retries it after `retry_delay` doubling per attempt
    (capped at `max_retry_delay`) until `max_retries` retries were made, then dead-letters it with its
    traceback; `Reject` dead-letters at once. A stop never cuts a job: the loop checks `ctx.stopping`
    only between jobs, and a job fetched in the same instant as the stop is handed back unstarted.
    `on_state("idle" | "busy")` lets the worker show whether it waits for a job or runs one.
    """
    who = consumer or consumer_name(ctx.name, getattr(ctx, "instance", None))
    while not ctx.stopping:
        _set(on_state, "idle")
        try:
            job = broker.fetch(queue, who, FETCH_WAIT, job_timeout, wake_fd)
        except BrokerError as exc:  # the broker already retried with backoff: pause, then go on
            ctx.log.error("queue %s: %s", queue, exc)
            _pause(wake_fd, BROKER_ERROR_PAUSE)
            continue
        if job is None:
            drain_fd(wake_fd)  # woken by a signal: the loop condition decides
            continue
        if ctx.stopping:
            broker.hand_back(job)
            break
        _set(on_state, "busy")
        code = _run_one(task, ctx, broker, job, max_retries, retry_delay, max_retry_delay)
        if code is not None:
            return code
    return 0


def _run_one(task: Callable[[Any, Job], Any], ctx: Any, broker: Broker, job: Job, max_retries: int,
             retry_delay: float, max_retry_delay: float) -> int | None:
    """One job: its outcome reported to the broker. Returns an exit code if the task asked to exit."""
    try:
        task(ctx, job)
    except SystemExit as exc:  # the task ends its worker: the job counts as a failed attempt
        _failed(ctx, broker, job, f"the task raised SystemExit({exc.code!r})", max_retries, retry_delay,
                max_retry_delay, reject=False)
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - a failing job must not end the worker
        _failed(ctx, broker, job, traceback.format_exc(), max_retries, retry_delay, max_retry_delay,
                reject=isinstance(exc, Reject))
        return None
    _report(ctx, "ack", lambda: broker.ack(job))
    return None


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
    """Tell the broker a job's outcome; if it cannot be told, the job comes back after job_timeout."""
    try:
        call()
    except BrokerError as exc:
        ctx.log.error("could not %s a job, it will be delivered again: %s", what, exc)


def _pause(wake_fd: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if wait_for_fds([wake_fd], left):
            return


def _set(on_state: Callable[[str], None] | None, state: str) -> None:
    if on_state is not None:
        on_state(state)
