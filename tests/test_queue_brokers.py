"""The broker contract, run against a real SQLite file and a real redis-server alike."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tprocess import ConfigError
from tprocess.queue import BrokerError, PayloadError, open_broker
from tprocess.queue.jobs import check_queue_name
from tprocess.queue.urls import parse_broker_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker(broker_url):
    b = open_broker(broker_url)
    yield b
    b.close()


def fetch(broker, timeout=5.0, job_timeout=30.0, queue="ip", consumer="host:inst:t-ip-0", wake_fd=None):
    return broker.fetch(queue, consumer, timeout, job_timeout, wake_fd)


def test_put_fetch_ack(broker):
    before = time.time()
    job_id = broker.put("ip", {"ip": "1.2.3.4"})
    job = fetch(broker)
    assert (job.id, job.data, job.attempt, job.queue) == (job_id, {"ip": "1.2.3.4"}, 1, "ip")
    assert before - 2 <= job.enqueued_at <= time.time() + 2
    assert broker.stats("ip")["ip"]["running"] == 1
    broker.ack(job)
    stats = broker.stats()["ip"]
    assert (stats["waiting"], stats["running"], stats["done_last_minute"]) == (0, 0, 1)
    assert fetch(broker, timeout=0.2) is None


def test_retry_delivers_again_with_attempt_plus_one(broker):
    job_id = broker.put("ip", [1, 2])
    broker.retry(fetch(broker), 0, "Traceback ...\nValueError: first")
    again = fetch(broker)
    assert (again.id, again.data, again.attempt) == (job_id, [1, 2], 2)
    broker.retry(again, 0, "second")
    assert fetch(broker).attempt == 3


def test_dead_letter_and_retry_dead(broker):
    first, second = broker.put_many("ip", ["a", "b"])
    broker.dead(fetch(broker), "Traceback (most recent call last):\nValueError: bad a")
    broker.dead(fetch(broker), "ValueError: bad b")
    assert broker.stats("ip")["ip"]["dead"] == 2
    dead = broker.dead_jobs("ip")
    assert [(d.id, d.data, d.attempts) for d in dead] == [(first, '"a"', 1), (second, '"b"', 1)]
    assert dead[0].error.endswith("ValueError: bad a")
    assert broker.retry_dead("ip", ["no-such-id"]) == []
    assert broker.retry_dead("ip", [second]) == [second]
    job = fetch(broker)
    assert (job.id, job.data, job.attempt) == (second, "b", 1)
    broker.ack(job)
    assert broker.retry_dead("ip") == [first]
    assert broker.dead_jobs("ip") == []
    assert fetch(broker).id == first


def test_delayed_jobs_become_visible_at_their_time(broker):
    started = time.monotonic()
    broker.put("ip", {"later": True}, delay=0.8)
    assert fetch(broker, timeout=0) is None
    assert broker.stats("ip")["ip"]["delayed"] == 1
    job = fetch(broker, timeout=5)
    waited = time.monotonic() - started
    assert job.data == {"later": True} and 0.7 <= waited < 3.0, waited
    broker.retry(job, 0.5, "again later")
    assert fetch(broker, timeout=0.2) is None
    again = fetch(broker, timeout=5)
    assert (again.id, again.attempt) == (job.id, 2)


def test_job_of_a_killed_consumer_is_delivered_again_after_job_timeout(broker):
    job_id = broker.put("ip", {"n": 1})  # the parent's connection exists before the fork
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the consumer that dies holding the job
        code = 1
        try:
            job = fetch(broker, job_timeout=1.0, consumer="host:inst:doomed")
            os.write(ready_w, job.id.encode())
            code = 0
            time.sleep(60)
        finally:
            os._exit(code)
    os.close(ready_w)
    assert os.read(ready_r, 100).decode() == job_id
    os.close(ready_r)
    assert broker.stats("ip")["ip"]["consumers"] == {"host:inst:doomed": 1}
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    killed_at = time.monotonic()
    job = fetch(broker, timeout=10, job_timeout=1.0)
    assert (job.id, job.data, job.attempt) == (job_id, {"n": 1}, 2)
    assert time.monotonic() - killed_at < 8
    broker.ack(job)
    assert broker.stats("ip")["ip"]["running"] == 0


def test_fifo_and_put_many_ids_in_order(broker):
    ids = broker.put_many("ip", [{"n": n} for n in range(200)])
    assert len(set(ids)) == 200
    got = []
    for _ in range(200):
        job = fetch(broker)
        got.append((job.id, job.data["n"]))
        broker.ack(job)
    assert got == list(zip(ids, range(200), strict=True))
    assert broker.put_many("ip", []) == []


def test_hand_back_makes_the_job_available_at_once_same_attempt(broker):
    job_id = broker.put("ip", "x")
    job = fetch(broker)
    broker.hand_back(job)
    started = time.monotonic()
    again = fetch(broker, timeout=5)
    assert (again.id, again.attempt) == (job_id, 1)
    assert time.monotonic() - started < 1.0
    assert broker.stats("ip")["ip"]["running"] == 1


def test_stats_per_queue_and_purge(broker):
    broker.put_many("ip", [1, 2, 3])
    broker.put("ip", 4, delay=60)
    broker.put("domain", "example.org")
    broker.dead(fetch(broker), "boom")
    fetch(broker)  # one running
    stats = broker.stats()
    assert {k: stats["ip"][k] for k in ("waiting", "delayed", "running", "dead")} == \
        {"waiting": 1, "delayed": 1, "running": 1, "dead": 1}
    assert stats["domain"]["waiting"] == 1
    assert broker.purge("ip") == 4
    assert {k: broker.stats("ip")["ip"][k] for k in ("waiting", "delayed", "running", "dead")} == \
        {"waiting": 0, "delayed": 0, "running": 0, "dead": 0}
    assert broker.stats("domain")["domain"]["waiting"] == 1
    broker.put("ip", "after purge")
    assert fetch(broker).data == "after purge"


def test_payload_not_valid_json_in_the_store_is_dead_lettered(broker):
    broker.put_encoded("ip", ["{not json", '{"ok": 1}'])  # the raw path skips the check a put makes
    job = fetch(broker)
    assert job.data == {"ok": 1}
    dead = broker.dead_jobs("ip")
    assert len(dead) == 1 and dead[0].data == "{not json"
    assert "not valid JSON" in dead[0].error


def test_payload_that_is_not_json_is_refused_at_put(broker):
    for bad in ({1, 2}, object(), float("nan")):
        with pytest.raises(PayloadError, match="not JSON-serializable") as info:
            broker.put("ip", bad)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(PayloadError):
        broker.put_many("ip", [1, 2, {3}])
    assert broker.stats("ip")["ip"]["waiting"] == 0  # nothing of the refused batch went in


def test_wake_fd_interrupts_a_waiting_fetch_at_once(broker):
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        timer = threading.Timer(0.3, os.write, (wake_w, b"\0"))
        timer.start()
        started = time.monotonic()
        assert fetch(broker, timeout=20, wake_fd=wake_r) is None
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 0.45, elapsed
        os.read(wake_r, 10)
        job_id = broker.put("ip", "after the wake")  # the interrupted wait lost nothing
        assert fetch(broker, wake_fd=wake_r).id == job_id
    finally:
        os.close(wake_r)
        os.close(wake_w)


@pytest.mark.parametrize("name", ["", "a b", "x" * 101, "a:b", "é", "a/b", None, 5])
def test_bad_queue_names_are_refused_in_one_line(broker, name):
    with pytest.raises(ConfigError) as info:
        broker.put(name, 1)
    assert "\n" not in str(info.value) and "queue name" in str(info.value)


def test_good_queue_names():
    for name in ("ip", "a.b-c_d", "x" * 100, "0"):
        assert check_queue_name(name) == name


@pytest.mark.parametrize("url", [
    "", "ip", "sqlite://", "sqlite:///", "sqlite:///tmp/dir/", "sqlite:///a?mode=ro", "mysql://x",
    "redis://", "redis://:6379/0", "redis://host:notaport/0", "redis://host:99999/0", "redis://host/db",
    "redis://host/0?x=1", "redis://ho st/0", "sqlite:///a\nb",
])
def test_bad_broker_urls_are_one_line_config_errors(url):
    with pytest.raises(ConfigError) as info:
        open_broker(url)
    assert "\n" not in str(info.value) and str(info.value).startswith("broker ")


def test_good_broker_urls(tmp_path):
    assert parse_broker_url("sqlite:///abs/q.db").path == "/abs/q.db"
    assert parse_broker_url("sqlite://rel/q.db", str(tmp_path)).path == f"{tmp_path}/rel/q.db"
    parsed = parse_broker_url("redis://:secret@localhost:6380/3")
    assert (parsed.host, parsed.port, parsed.db) == ("localhost", 6380, 3)
    assert parse_broker_url("redis://localhost").port == 6379


def test_unreachable_redis_and_missing_sqlite_folder_are_one_line_errors(tmp_path):
    from queue_fixtures import free_port

    with pytest.raises(BrokerError) as info:
        open_broker(f"redis://127.0.0.1:{free_port()}/0", retry_for=0).check()
    assert "\n" not in str(info.value) and "onnect" in str(info.value)
    with pytest.raises(BrokerError, match="does not exist"):
        open_broker(f"sqlite://{tmp_path}/missing/q.sqlite3").check()


def test_idle_sqlite_consumer_never_takes_the_write_lock(tmp_path):
    """A consumer of an empty queue (or of jobs not due yet) only reads: a producer holding the
    write lock does not make it wait (it would, up to the busy time-out, for BEGIN IMMEDIATE)."""
    import sqlite3

    path = tmp_path / "q.sqlite3"
    broker = open_broker(f"sqlite://{path}")
    broker.put_many("ip", ["later"], delay=3600)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a producer in the middle of a put
    try:
        assert fetch(broker, timeout=0.2) is None
        assert writer.in_transaction  # it returned while the lock was still held
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        broker.close()


def test_sqlite_full_database_is_a_clear_error(tmp_path):
    broker = open_broker(f"sqlite://{tmp_path}/q.sqlite3")
    broker.check()
    broker._db().execute("PRAGMA max_page_count = 40")  # stands in for a full file system
    with pytest.raises(BrokerError, match="full"):
        broker.put_many("ip", ["x" * 1000] * 1000)
    broker.close()


def test_redis_restart_is_survived_with_nothing_lost(tmp_path, monkeypatch):
    from queue_fixtures import RedisServer

    from tprocess import logs

    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    monkeypatch.setattr(logs.log, "fd", log_fd)

    server = RedisServer(tmp_path, persistent=True).start()
    restart = threading.Timer(0.5, server.start)
    try:
        broker = open_broker(server.url)
        first, second = broker.put_many("ip", ["one", "two"])
        held = fetch(broker)
        server.stop()  # a graceful shutdown: the append-only file keeps the queue
        restart.start()
        broker.ack(held)  # retried with backoff until the server is back
        job = fetch(broker, timeout=10)
        assert (held.id, job.id, job.data, job.attempt) == (first, second, "two", 1)
        broker.ack(job)
        stats = broker.stats("ip")["ip"]
        assert (stats["waiting"], stats["running"]) == (0, 0)
        assert "retrying in" in (tmp_path / "log").read_text()
        broker.close()
    finally:
        if restart.is_alive() or restart.finished.is_set():
            restart.join()
        os.close(log_fd)
        server.stop()
