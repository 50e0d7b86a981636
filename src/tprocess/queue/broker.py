"""The broker interface: what the producer API, the `queue` commands and the consuming loop rely on.

Delivery is at least once: a job leaves the broker only when acknowledged; a job whose consumer died
is delivered again (attempt + 1) once it has been unacknowledged for `job_timeout` seconds.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

from .jobs import DeadJob, Job, check_queue_name, encode_payload


class Broker(abc.ABC):
    """A job store. Every method may raise BrokerError; names are checked (ConfigError) before use."""

    url: str

    def put(self, queue: str, data: Any, delay: float = 0) -> str:
        """Add one job, visible after `delay` seconds; return its id."""
        return self.put_encoded(check_queue_name(queue), [encode_payload(data)], delay)[0]

    def put_many(self, queue: str, items: Iterable[Any], delay: float = 0) -> list[str]:
        """Add many jobs in one round trip (one transaction); return their ids in order."""
        payloads = [encode_payload(item) for item in items]  # all checked before anything is sent
        return self.put_encoded(check_queue_name(queue), payloads, delay)

    @abc.abstractmethod
    def put_encoded(self, queue: str, payloads: list[str], delay: float = 0) -> list[str]:
        """Add jobs whose payloads are JSON text already (the fast path of `enqueue`)."""

    def fetch(self, queue: str, consumer: str, timeout_s: float, job_timeout: float,
              wake_fd: int | None = None) -> Job | None:
        """The next job for `consumer`, waiting up to `timeout_s`; None on time-out or at once when
        `wake_fd` becomes readable (the caller drains it). A job whose payload is not valid JSON
        is dead-lettered with the reason and never returned."""
        jobs = self.fetch_many(queue, consumer, 1, timeout_s, job_timeout, wake_fd)
        return jobs[0] if jobs else None

    @abc.abstractmethod
    def fetch_many(self, queue: str, consumer: str, count: int, timeout_s: float, job_timeout: float,
                   wake_fd: int | None = None, acks: list[Job] | None = None) -> list[Job]:
        """Acknowledge the done jobs in `acks`, then up to `count` jobs for `consumer` in queue order,
        waiting up to `timeout_s` for the first; [] on time-out or when `wake_fd` becomes readable.

        The acknowledgements are applied before any wait (a held-back ack never waits on an idle
        queue) and, where the broker can, in the same round trip as the read. The jobs applied are
        removed from `acks`: what is left in it after a BrokerError or a wake-up is still to be sent
        (an ack is idempotent, so sending one twice is harmless). Every job returned runs on one
        lease: its `job_timeout` clock starts now, so `count` must be small enough to finish them all.
        """

    def ack(self, job: Job) -> None:
        """The job is done: remove it."""
        self.ack_many([job])

    @abc.abstractmethod
    def ack_many(self, jobs: list[Job]) -> None:
        """Every job of `jobs` is done: remove them (one round trip where the broker can). The jobs
        acknowledged are removed from the list, so on a BrokerError it holds the ones still to send."""

    @abc.abstractmethod
    def retry(self, job: Job, delay: float, error_text: str) -> None:
        """The job failed: deliver it again after `delay` seconds with attempt + 1."""

    @abc.abstractmethod
    def dead(self, job: Job, error_text: str) -> None:
        """The job failed for good: move it to the queue's dead-letter list with the error."""

    def hand_back(self, job: Job) -> None:
        """A job fetched but not started: make it available again at once, same attempt."""
        self.hand_back_many([job])

    @abc.abstractmethod
    def hand_back_many(self, jobs: list[Job]) -> None:
        """Jobs fetched but not started (a prefetched batch cut by a stop): available again at once."""

    @abc.abstractmethod
    def stats(self, queue: str | None = None) -> dict[str, dict[str, Any]]:
        """Per queue: waiting, delayed, running, done_last_minute, dead, consumers {name: running}."""

    @abc.abstractmethod
    def dead_jobs(self, queue: str) -> list[DeadJob]:
        """The queue's dead-letter list, oldest failure first."""

    @abc.abstractmethod
    def retry_dead(self, queue: str, ids: Iterable[str] | None = None) -> list[str]:
        """Put dead jobs (all, or those ids) back in the queue with attempt 1; return the ids moved."""

    @abc.abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every job of the queue (waiting, delayed, running and dead); return how many."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BrokerError unless the broker answers (used before anything is forked)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release this process's connection (safe to call twice)."""

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
