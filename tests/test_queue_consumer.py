"""run_jobs, the consuming loop, in-process with a minimal context against both real brokers."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
from helpers import wait_for

from tprocess import Reject, logs
from tprocess.queue import open_broker
from tprocess.queue.consumer import BatchSize, retry_delay_for, run_jobs

pytestmark = pytest.mark.timeout(60)


class Loop:
    """run_jobs in a thread, with a fake ctx and a wake-up pipe like a worker's."""

    def __init__(self, url: str, task, **options) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.ctx = SimpleNamespace(name="t-ip-0", instance="t", stopping=False,
                                   log=logs.log)
        self.broker = open_broker(url)
        self.code: int | None = None
        options = {"job_timeout": 30.0, "max_retries": 2, "retry_delay": 0.05, **options}

        def run() -> None:
            self.code = run_jobs(task, self.ctx, self.broker, "ip", options["job_timeout"],
                                 options["max_retries"], options["retry_delay"], self.wake_r)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        """Ask to stop as a signal would (flag, then a byte on the wake fd); seconds until it returned."""
        started = time.monotonic()
        self.ctx.stopping = True
        os.write(self.wake_w, b"\0")
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "run_jobs did not return after the stop"
        return time.monotonic() - started

    def close(self) -> None:
        self.broker.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def test_run_jobs_acks_retries_with_doubling_delay_and_dead_letters(broker_url):
    seen: dict[str, list[tuple[int, float]]] = {}

    def task(ctx, job):
        seen.setdefault(job.data, []).append((job.attempt, time.monotonic()))
        if job.data == "reject":
            raise Reject("not worth a retry")
        if job.data == "always" or (job.data == "once" and job.attempt == 1):
            raise ValueError(f"failing {job.data}")

    producer = open_broker(broker_url)
    producer.put_many("ip", ["ok", "once", "always", "reject"])
    loop = Loop(broker_url, task)
    try:
        wait_for(lambda: producer.stats("ip")["ip"]["dead"] == 2 and len(seen.get("once", ())) == 2
                 and producer.stats("ip")["ip"]["waiting"] == 0, timeout=20, what="every job settled")
        assert loop.stop() < 2 and loop.code == 0
    finally:
        loop.close()
    assert [a for a, _ in seen["ok"]] == [1]
    assert [a for a, _ in seen["once"]] == [1, 2]
    assert [a for a, _ in seen["always"]] == [1, 2, 3]  # max_retries=2: three deliveries
    assert [a for a, _ in seen["reject"]] == [1]
    times = [t for _, t in seen["always"]]
    assert times[1] - times[0] >= 0.045 and times[2] - times[1] >= 0.095  # 0.05 then 0.1
    dead = {d.data: d for d in producer.dead_jobs("ip")}
    assert set(dead) == {'"always"', '"reject"'}
    assert "ValueError: failing always" in dead['"always"'].error and dead['"always"'].attempts == 3
    assert "Reject: not worth a retry" in dead['"reject"'].error
    stats = producer.stats("ip")["ip"]
    assert (stats["waiting"], stats["running"], stats["done_last_minute"]) == (0, 0, 2)
    producer.close()


def test_idle_run_jobs_stops_within_100_ms(broker_url):
    loop = Loop(broker_url, lambda ctx, job: None)
    try:
        time.sleep(0.3)  # let it settle into its wait for a job: nothing to await here
        assert loop.thread.is_alive()
        assert loop.stop() < 0.1
        assert loop.code == 0
    finally:
        loop.close()


def test_a_stop_during_a_job_lets_it_finish_and_acknowledges_it(broker_url):
    started, release = threading.Event(), threading.Event()

    def task(ctx, job):
        started.set()
        assert release.wait(10)

    producer = open_broker(broker_url)
    producer.put_many("ip", ["held", "next"])
    loop = Loop(broker_url, task)
    try:
        assert started.wait(10)
        loop.ctx.stopping = True
        os.write(loop.wake_w, b"\0")
        time.sleep(0.1)  # the stop must not end the job: give it a chance to (wrongly) do so
        assert loop.thread.is_alive()
        release.set()
        loop.thread.join(10)
        assert loop.code == 0
    finally:
        release.set()
        loop.close()
    stats = producer.stats("ip")["ip"]
    assert (stats["waiting"], stats["running"], stats["done_last_minute"]) == (1, 0, 1)
    producer.close()


def test_a_job_fetched_as_the_stop_comes_is_handed_back_unstarted(broker_url):
    producer = open_broker(broker_url)
    job_id = producer.put("ip", "unstarted")
    ran = []
    broker = open_broker(broker_url)
    ctx = SimpleNamespace(name="t-ip-0", stopping=False, log=logs.log)
    real_fetch = broker.fetch_many

    def fetch_then_stop(*args, **kwargs):  # the stop signal lands while fetch returns
        jobs = real_fetch(*args, **kwargs)
        ctx.stopping = True
        return jobs
    broker.fetch_many = fetch_then_stop
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    try:
        assert run_jobs(lambda c, j: ran.append(j), ctx, broker, "ip", 30.0, 3, 1.0, wake_r) == 0
    finally:
        os.close(wake_r)
        os.close(wake_w)
        broker.close()
    assert ran == []
    assert producer.stats("ip")["ip"]["running"] == 0
    job = producer.fetch("ip", "other", 5, 30)
    assert (job.id, job.attempt) == (job_id, 1)
    producer.close()


@pytest.mark.parametrize("exit_with,code", [(7, 7), (None, 0), (263, 7)])
def test_task_exiting_ends_the_loop_with_its_code_and_the_job_is_retried(broker_url, exit_with, code):
    """The worker's exit code is worked out as for a plain task: sys.exit() is a planned exit (0)."""
    producer = open_broker(broker_url)
    producer.put("ip", "exit")

    def task(ctx, job):
        raise SystemExit(exit_with)
    loop = Loop(broker_url, task)
    try:
        loop.thread.join(10)
        assert loop.code == code
    finally:
        loop.close()
    job = producer.fetch("ip", "other", 5, 30)
    assert (job.data, job.attempt) == ("exit", 2)
    producer.close()


def test_retry_delay_doubles_and_is_capped():
    assert [retry_delay_for(a, 1.0, 5.0) for a in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


# --- batches: prefetching and acknowledgements sent together with the next fetch ----------------


def test_batch_size_starts_at_one_doubles_while_jobs_are_fast_and_is_bounded():
    sizer = BatchSize(job_timeout=300.0)
    assert sizer.next() == 1  # nothing measured yet
    sizer.record(0.0001)
    assert [sizer.next() for _ in range(8)] == [2, 4, 8, 16, 32, 64, 64, 64]
    assert sizer.next(most=3) == 3  # max_tasks: no job is fetched only to be handed back
    sizer.record(0.005)  # a slow job: the estimate rises at once, the batch shrinks at once
    assert sizer.next() == 4  # 0.02 s of work at 5 ms per job
    short = BatchSize(job_timeout=0.05)
    short.record(0.001)
    assert [short.next() for _ in range(4)] == [2, 4, 5, 5]  # a tenth of job_timeout: 5 ms of work


def test_acks_follow_the_task_and_are_all_sent_before_the_loop_waits_again(broker_url):
    """Each job is acknowledged only after its task returned, and every ack held for batching is
    sent before the worker waits on an empty queue (not 30 s later with the next fetch)."""
    producer = open_broker(broker_url)
    probe = open_broker(broker_url)
    count, returned, seen_early = 150, [0], []

    def task(ctx, job):
        s = probe.stats("ip")["ip"]
        if s["done_last_minute"] > returned[0] or s["running"] < 1:
            seen_early.append((job.data, s["done_last_minute"], returned[0], s["running"]))
        returned[0] += 1

    producer.put_many("ip", list(range(count)))
    loop = Loop(broker_url, task)
    try:
        wait_for(lambda: returned[0] == count, timeout=30, what="every job run")
        wait_for(lambda: producer.stats("ip")["ip"]["done_last_minute"] == count, timeout=2,
                 what="every ack sent while the loop waits for more jobs")
        assert loop.thread.is_alive()
        assert producer.stats("ip")["ip"]["running"] == 0
        assert loop.stop() < 0.1  # an idle worker with nothing held stops at once
    finally:
        loop.close()
        probe.close()
    assert seen_early == [], "a job was acknowledged before its task returned"
    producer.close()


def test_prefetched_jobs_are_handed_back_at_once_on_stop(broker_url, monkeypatch):
    monkeypatch.setattr(BatchSize, "next", lambda self, most=64: min(8, most))
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def task(ctx, job):
        ran.append(job.data)
        if job.data == 2:
            started.set()
            assert release.wait(10)

    producer = open_broker(broker_url)
    producer.put_many("ip", list(range(20)))
    loop = Loop(broker_url, task)
    try:
        assert started.wait(10)
        held = producer.stats("ip")["ip"]
        assert held["running"] == 8 and held["waiting"] == 12  # a batch of 8: job 2 runs, 5 wait behind it
        loop.ctx.stopping = True
        os.write(loop.wake_w, b"\0")
        release.set()
        loop.thread.join(10)
        assert loop.code == 0
    finally:
        release.set()
        loop.close()
    assert ran == [0, 1, 2]
    after = producer.stats("ip")["ip"]
    assert (after["running"], after["waiting"], after["done_last_minute"]) == (0, 17, 3)
    jobs = producer.fetch_many("ip", "other", 20, 5, 30)  # at once: not after job_timeout (30 s)
    assert sorted((j.data, j.attempt) for j in jobs) == [(n, 1) for n in range(3, 20)]
    if broker_url.startswith("sqlite"):  # first in line again; a Redis stream only appends: at its tail
        assert [j.data for j in jobs] == list(range(3, 20))
    producer.close()


def test_a_batch_whose_lease_a_slow_job_ate_is_handed_back_not_run_late(broker_url, monkeypatch):
    """job_timeout runs from the fetch for every job of a batch: once half of it is gone, the jobs not
    started yet go back to the queue with a new lease to come, rather than run when another consumer
    may already have taken them over (job 3 would start 1.1 s after the fetch, past job_timeout 1 s)."""
    monkeypatch.setattr(BatchSize, "next", lambda self, most=64: min(4, most))
    runs: list[tuple[int, int]] = []
    first_started = threading.Event()

    def task(ctx, job):
        runs.append((job.data, job.attempt))
        if job.data == 0:
            first_started.set()
        time.sleep(0.7 if job.data == 0 else 0.2)

    producer = open_broker(broker_url)
    producer.put_many("ip", list(range(4)))
    first = Loop(broker_url, task, job_timeout=1.0)
    assert first_started.wait(10)
    second = Loop(broker_url, task, job_timeout=1.0)  # takes over whatever outlives its lease
    second.ctx.name = "t-ip-1"
    try:
        wait_for(lambda: producer.stats("ip")["ip"]["done_last_minute"] == 4, timeout=10, what="every ack")
        time.sleep(0.5)  # a late duplicate would show here: nothing to await
        first.stop()
        second.stop()
    finally:
        first.close()
        second.close()
    assert sorted(runs) == [(n, 1) for n in range(4)]  # handed back unstarted: the same attempt, run once
    producer.close()


def test_a_long_job_does_not_hold_back_the_acks_of_the_jobs_before_it(broker_url, monkeypatch):
    monkeypatch.setattr(BatchSize, "next", lambda self, most=64: min(4, most))
    long_started, release = threading.Event(), threading.Event()

    def task(ctx, job):
        if job.data == "long":
            long_started.set()
            assert release.wait(10)

    producer = open_broker(broker_url)
    producer.put_many("ip", ["a", "b", "long", "c"])
    loop = Loop(broker_url, task)
    try:
        assert long_started.wait(10)
        wait_for(lambda: producer.stats("ip")["ip"]["done_last_minute"] == 2, timeout=1,
                 what="the acks of the 2 jobs done before the long one (held 0.05 s at most)")
        release.set()
        wait_for(lambda: producer.stats("ip")["ip"]["done_last_minute"] == 4, timeout=5, what="every ack")
        assert loop.stop() < 0.1
    finally:
        release.set()
        loop.close()
    producer.close()
