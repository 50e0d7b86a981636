"""A queue group's worker: `task(ctx, job)` once per job, with the worker's slot kept right.

worker.py calls `serve_jobs` instead of its plain task loop when the group has a `queue`. The broker
is opened here, in the child after fork (the master only checked it before forking, then closed it).
The slot reads idle while the worker waits for a job and busy while it runs one; TASK_START is
stamped per job (task_timeout and `status` task time count per job), tasks and errors are counted
per job, and max_tasks / max_memory recycle the worker between jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import DEFAULT_JOB_TIMEOUT, DEFAULT_MAX_RETRIES, DEFAULT_RETRY_DELAY, _first
from ..slots import BUSY, IDLE, TASK_START
from .consumer import MAX_BATCH, run_jobs
from .jobs import BrokerError, Job, consumer_name
from .urls import open_broker

if TYPE_CHECKING:
    from ..config import Config, GroupConfig
    from ..worker import Context, WorkerSpec


@dataclass(frozen=True)
class JobOptions:
    """What a queue group's worker needs to consume its queue."""

    broker_url: str
    queue: str
    instance: str  # the consumer's name is HOST:INSTANCE:WORKER-TITLE
    job_timeout: float
    max_retries: int
    retry_delay: float
    concurrency: int


def job_options(config: Config, group: GroupConfig) -> JobOptions | None:
    """The job options of a worker of `group`, or None for a group without a queue."""
    if not group.queue:
        return None
    return JobOptions(
        broker_url=config.broker_url(), queue=group.queue, instance=config.name,
        job_timeout=_first(group.job_timeout, DEFAULT_JOB_TIMEOUT),
        max_retries=int(_first(group.max_retries, DEFAULT_MAX_RETRIES)),
        retry_delay=_first(group.retry_delay, DEFAULT_RETRY_DELAY),
        concurrency=int(_first(group.concurrency, 1)))


def serve_jobs(spec: WorkerSpec, ctx: Context, options: JobOptions) -> int:
    """Run the group's task for each job until a stop; return the worker's exit code."""
    from ..aio import is_async

    consumer = consumer_name(ctx.name, options.instance)
    if is_async(spec.task):
        from .async_consumer import run_async_jobs

        return run_async_jobs(spec, ctx, options, consumer)
    broker = open_broker(options.broker_url)
    counted = CountedJobs(spec, ctx)
    try:
        code = run_jobs(counted.task, ctx, broker, options.queue, options.job_timeout, options.max_retries,
                        options.retry_delay, ctx._wake_fd, consumer=consumer, on_state=counted.on_state,
                        jobs_left=counted.jobs_left)
    finally:
        try:
            broker.close()
        except BrokerError:
            pass
    return counted.exit_code(code)


class CountedJobs:
    """The task wrapped to keep the slot's words: state, TASK_START, tasks, errors, recycling."""

    def __init__(self, spec: WorkerSpec, ctx: Context) -> None:
        self.spec, self.ctx = spec, ctx
        self.words, self.base = spec.slot.words, spec.slot.base
        from ..worker import TaskCounter

        self.counter = TaskCounter(spec, "jobs")  # tasks, errors, durations; max_tasks / max_memory

    def on_state(self, state: str) -> None:
        slot = self.spec.slot
        if state == "busy":
            self.words[self.base + TASK_START] = time.monotonic_ns()  # before "busy": never a stale stamp
            slot.state = BUSY
        else:
            slot.state = IDLE

    def jobs_left(self) -> int:
        """Jobs this worker may still run before max_tasks recycles it (a bound on prefetching)."""
        most = self.spec.max_tasks
        return max(1, most - self.counter.recycling.done) if most else MAX_BATCH

    def task(self, ctx: Context, job: Job) -> Any:
        began = time.monotonic_ns()
        ok = False
        try:
            result = self.spec.task(ctx, job)
            ok = True
            return result
        finally:
            if self.counter.ended(ok, began):
                self.ctx.stopping = True  # run_jobs ends after this job is reported

    def exit_code(self, code: int) -> int:
        return self.counter.exit_code(self.spec, code)
