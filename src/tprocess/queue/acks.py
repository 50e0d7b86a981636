"""Acknowledgements held back for batching by the sync consuming loop, with a bound on how long.

run_jobs sends the acks of a batch's finished jobs with its next fetch (one round trip). While a
job runs, the acks of the jobs before it wait; if that job runs long, they must not wait with it (a
SIGKILL would run them again, and past job_timeout another consumer would take them over). So a
thread of its own, with its own broker connection, sends the acks held longer than MAX_HOLD. With
fast jobs the next fetch always comes first and the thread only wakes every MAX_HOLD to look;
a worker that fetches one job at a time never holds an ack while a job runs, and never starts it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .broker import Broker
from .jobs import BrokerError, Job

MAX_HOLD = 0.05  # seconds an ack may wait for the next fetch (a batch holds at most 0.02 s of work)


class HeldAcks:
    """The finished jobs whose ack is not sent yet: `take()` them for a fetch, `add()` after a job."""

    def __init__(self, open_sender: Callable[[], Broker], log: Any) -> None:
        self._open_sender, self._log = open_sender, log
        self._lock = threading.Lock()
        self._jobs: list[Job] = []
        self._oldest = 0.0  # when the oldest held ack was added (CLOCK_MONOTONIC)
        self._pending = threading.Event()  # set when a job starts while acks are held
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, job: Job) -> None:
        with self._lock:
            if not self._jobs:
                self._oldest = time.monotonic()
            self._jobs.append(job)

    def job_starts(self) -> None:
        """A job starts while acks are held (a batch): the thread sees to them if it runs long. Only
        then is the thread woken (at most once per MAX_HOLD): a worker fetching one job at a time
        sends every ack with its next fetch, and its thread never runs."""
        if not self._jobs:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_late_acks, name="acks", daemon=True)
            self._thread.start()
        if not self._pending.is_set():  # set() takes a lock and notifies: not once per job
            self._pending.set()

    def take(self) -> list[Job]:
        with self._lock:
            return self._take_locked()

    def give_back(self, jobs: list[Job]) -> None:
        """Acks a fetch could not send (a broker error, a wake-up): they go with the next one."""
        if jobs:
            with self._lock:
                if not self._jobs:
                    self._oldest = time.monotonic()
                self._jobs[:0] = jobs

    def close(self) -> None:
        """Stop the thread (an ack it is sending is sent first); the caller sends what is left."""
        self._closing.set()
        self._pending.set()
        if self._thread is not None:
            self._thread.join()

    def _send_late_acks(self) -> None:
        from ..aio import block_signals_in_thread

        block_signals_in_thread()
        sender: Broker | None = None
        try:
            while self._pending.wait() and not self._closing.is_set():
                with self._lock:
                    if not self._jobs:  # taken meanwhile: sleep until a job starts with acks held
                        self._pending.clear()
                        continue
                    late = time.monotonic() - self._oldest >= MAX_HOLD
                    due = self._oldest + MAX_HOLD
                    jobs = self._take_locked() if late else []
                if not jobs:
                    self._closing.wait(max(0.0, due - time.monotonic()))
                    continue
                sender = sender or self._open_sender()
                try:
                    sender.ack_many(jobs)
                except BrokerError as exc:
                    self._log.error("could not acknowledge jobs, they will be delivered again: %s", exc)
        finally:
            if sender is not None:
                try:
                    sender.close()
                except BrokerError:
                    pass

    def _take_locked(self) -> list[Job]:
        jobs, self._jobs = self._jobs, []
        self._pending.clear()
        return jobs
