"""The distributed broker: one Redis stream per queue with a consumer group.

Keys of queue NAME: the stream `tprocess:q:NAME` (group `tprocess`), the delayed jobs
`tprocess:q:NAME:delayed` (a sorted set by due time), the dead-letter hash `tprocess:q:NAME:dead`
(job id -> the job and its last error), per-second done counters `tprocess:q:NAME:done:SECOND`, and the
set of known queues `tprocess:queues`. A job's id is the stream id of its first entry; a retried or
handed-back job is a new entry that carries its id (`i`), next attempt (`a`) and enqueued time (`t`).

Waiting for a job: XREADGROUP BLOCK is sent on a connection of its own and the process polls that
connection's socket together with the worker's wake-up fd. A stop wakes the poll at once; CLIENT UNBLOCK
(from the main connection) then ends the blocked read, and a job the server handed over in that instant
is handed back. So an idle worker stops within milliseconds, with one round trip per job, not one per
short BLOCK slice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from ..logs import log
from . import redis_scripts
from .broker import Broker
from .jobs import BrokerError, DeadJob, Job, check_queue_name, decode_payload
from .waiting import wait_for_fds

T = TypeVar("T")

GROUP = "tprocess"
QUEUES = "tprocess:queues"
MOVE_INTERVAL = 0.2  # how often a waiting consumer moves due delayed jobs into the stream
MOVE_BATCH = 1000
RETRY_FOR = 60.0  # how long a lost connection is retried before an operation fails
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
WOKEN = object()


def stream_key(queue: str) -> str:
    return f"tprocess:q:{queue}"


def claim_interval(job_timeout: float) -> float:
    """How often a consumer looks for jobs whose consumer died (a fraction of job_timeout)."""
    return min(5.0, max(0.05, job_timeout / 4))


class RedisBroker(Broker):
    def __init__(self, url: str, retry_for: float = RETRY_FOR) -> None:
        self.url = url
        self.retry_for = retry_for
        self._pid = -1
        self._setup()

    # --- connections ---------------------------------------------------------------------

    def _setup(self) -> None:
        """Clients for this process (after a fork the parent's sockets are left alone)."""
        self._pid = os.getpid()
        self._r = redis.Redis.from_url(self.url, socket_connect_timeout=5, health_check_interval=30)
        self._block_pool = redis.ConnectionPool.from_url(self.url, socket_connect_timeout=5)
        self._block_conn: Any = None
        self._block_sock: Any = None
        self._block_id: int | None = None
        self._s = {name: self._r.register_script(getattr(redis_scripts, name)) for name in (
            "PUT_DELAYED", "MOVE_DUE", "CLAIM", "ACK_MANY", "RETRY", "DEAD", "HAND_BACK", "RETRY_DEAD")}
        self._groups: set[str] = set()
        self._next_move: dict[str, float] = {}
        self._next_claim: dict[str, float] = {}

    def _client(self) -> redis.Redis:
        if self._pid != os.getpid():
            self._setup()
        return self._r

    def _call(self, what: str, fn: Callable[[], T], wake_fd: int | None = None) -> T | object:
        """Run fn; a lost connection is logged and retried with a growing pause, up to retry_for
        seconds (then BrokerError). Returns WOKEN when wake_fd became readable during a pause."""
        deadline = time.monotonic() + self.retry_for
        pause = BACKOFF_FIRST
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._drop_block_conn()
                if time.monotonic() + pause > deadline:
                    raise BrokerError(f"{self.url}: {what}: {exc}") from None
                log.warning("broker %s: %s: %s; retrying in %.1f s", self.url, what, exc, pause)
                if wait_for_fds([wake_fd], pause) and wake_fd is not None:
                    return WOKEN
                pause = min(pause * 2, BACKOFF_MAX)
            except redis.RedisError as exc:
                raise BrokerError(f"{self.url}: {what}: {exc}") from None

    def check(self) -> None:
        self._call("ping", lambda: self._client().ping())

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        self._drop_block_conn()
        self._block_pool.disconnect()
        self._r.close()

    def _ensure_group(self, queue: str, again: bool = False) -> None:
        if queue in self._groups and not again:
            return
        try:  # from 0: jobs put before the first consumer came are delivered too
            self._client().xgroup_create(stream_key(queue), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(queue)

    # --- producing -----------------------------------------------------------------------

    def put_encoded(self, queue: str, payloads: list[str], delay: float = 0) -> list[str]:
        if not payloads:
            return []
        key = stream_key(queue)
        if delay > 0:
            ids = [uuid.uuid4().hex for _ in payloads]
            args: list[Any] = [delay]
            for job_id, payload in zip(ids, payloads, strict=True):
                args += (job_id, payload)

            def put_delayed() -> list[str]:
                pipe = self._client().pipeline(transaction=True)
                self._s["PUT_DELAYED"](keys=[key + ":delayed"], args=args, client=pipe)
                pipe.sadd(QUEUES, queue)
                pipe.execute()
                return ids
            return self._call("put", put_delayed)  # type: ignore[return-value]

        def put_now() -> list[str]:
            pipe = self._client().pipeline(transaction=True)
            for payload in payloads:
                pipe.execute_command("XADD", key, "*", "d", payload)
            pipe.sadd(QUEUES, queue)  # in every put: a purge may have removed it meanwhile
            replies = pipe.execute()
            return [r.decode() for r in replies[: len(payloads)]]
        return self._call("put", put_now)  # type: ignore[return-value]

    # --- consuming -----------------------------------------------------------------------

    def fetch_many(self, queue: str, consumer: str, count: int, timeout_s: float, job_timeout: float,
                   wake_fd: int | None = None, acks: list[Job] | None = None) -> list[Job]:
        check_queue_name(queue)
        deadline = time.monotonic() + timeout_s
        acks = acks if acks is not None else []
        while True:
            got = self._call("fetch", lambda: self._fetch_once(
                queue, consumer, count, deadline, job_timeout, wake_fd, acks), wake_fd)
            if got is WOKEN:
                return []
            if got:
                return got  # type: ignore[return-value]
            if time.monotonic() >= deadline:
                return []

    def _fetch_once(self, queue: str, consumer: str, count: int, deadline: float, job_timeout: float,
                    wake_fd: int | None, acks: list[Job]) -> list[Job] | object:
        """One look: the done jobs acknowledged with a read that does not wait (one round trip), due
        delayed jobs moved, jobs of dead consumers claimed, then one blocking read."""
        self._ensure_group(queue)
        key = stream_key(queue)
        if acks:
            jobs = self._read(queue, consumer, count, 0.0, None, acks)
            if jobs:
                return jobs
        now = time.monotonic()
        if now >= self._next_move.get(queue, 0.0):
            until_next = float(self._s["MOVE_DUE"](keys=[key, key + ":delayed"], args=[MOVE_BATCH]))
            wait = MOVE_INTERVAL if until_next < 0 else min(MOVE_INTERVAL, until_next)
            self._next_move[queue] = now + wait
        if now >= self._next_claim.get(queue, 0.0):
            self._next_claim[queue] = now + claim_interval(job_timeout)
            jobs = self._claim(queue, consumer, count, job_timeout)
            if jobs:
                return jobs
        block_s = min(deadline, self._next_move[queue], self._next_claim[queue]) - time.monotonic()
        return self._read(queue, consumer, count, block_s, wake_fd, acks)

    def _claim(self, queue: str, consumer: str, count: int, job_timeout: float) -> list[Job]:
        try:
            entries, counts = self._s["CLAIM"](keys=[stream_key(queue)],
                                               args=[GROUP, consumer, int(job_timeout * 1000), count])
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group(queue, again=True)
            return []
        jobs = []
        for (entry_id, flat), deliveries in zip(entries, counts, strict=True):
            job = self._to_job(queue, consumer, entry_id, _pairs(flat), deliveries=int(deliveries))
            if job is not None:
                log.warning("job %s of queue %s: its consumer held it for over %.0f s; delivering it again",
                            job.id, queue, job_timeout)
                jobs.append(job)
        return jobs

    def _block_connection(self) -> Any:
        if self._pid != os.getpid():
            self._setup()
        conn = self._block_conn
        if conn is None:
            conn = self._block_conn = self._block_pool.get_connection()
        if conn._sock is None or conn._sock is not self._block_sock:
            conn.connect()
            conn.send_command("CLIENT", "ID")
            self._block_id = conn.read_response()
            self._block_sock = conn._sock
        return conn

    def _drop_block_conn(self) -> None:
        if self._block_conn is not None:
            self._block_conn.disconnect()
            self._block_pool.release(self._block_conn)
            self._block_conn = self._block_sock = None

    def _read(self, queue: str, consumer: str, count: int, block_s: float, wake_fd: int | None,
              acks: list[Job]) -> list[Job] | object:
        """XREADGROUP COUNT `count` on the blocking connection, pipelined after the acknowledgement
        of `acks` (then the read does not wait: an ack is never held up by an idle queue); waits up to
        block_s otherwise. WOKEN if wake_fd fired (jobs served in that instant are handed back)."""
        conn = self._block_connection()
        key = stream_key(queue)
        read: list[Any] = ["XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count]
        block_ms = 0 if acks else int(block_s * 1000)
        if block_ms >= 1:
            read += ["BLOCK", block_ms]
        read += ["STREAMS", key, ">"]
        commands = [read]
        if acks:
            ids = [job.receipt[0] for job in acks]
            commands.insert(0, ["EVAL", redis_scripts.ACK_MANY, 2, key, key + ":done:", GROUP, *ids])
        conn.send_packed_command(conn.pack_commands(commands))
        woken = False
        if block_ms >= 1:
            sock = conn._sock.fileno()
            ready = wait_for_fds([sock, wake_fd], block_ms / 1000 + 2.0)
            woken = wake_fd is not None and wake_fd in ready
            if woken and sock not in ready:
                self._r.client_unblock(self._block_id)  # the blocked read returns nil at once
        if acks:
            self._acked(conn, acks)
        try:
            reply = conn.read_response()
        except redis.ResponseError as exc:  # the stream was purged under a blocked read
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            self._groups.discard(queue)
            return WOKEN if woken else []
        jobs = [job for _, stream in (reply or []) for entry_id, flat in stream
                if (job := self._to_job(queue, consumer, entry_id, _pairs(flat), 1)) is not None]
        if woken:  # served in the same instant as the stop: give them back
            self.hand_back_many(jobs)
            return WOKEN
        return jobs

    def _acked(self, conn: Any, acks: list[Job]) -> None:
        """Read the reply of a pipelined ACK_MANY: the acks are applied (or cannot be: then they come
        back after job_timeout, as if the worker had died)."""
        try:
            conn.read_response()
        except redis.ResponseError as exc:
            log.error("broker %s: acknowledging %d jobs: %s; they will be delivered again", self.url,
                      len(acks), exc)
        acks.clear()

    def _to_job(self, queue: str, consumer: str, entry_id: bytes, fields: dict[bytes, bytes],
                deliveries: int) -> Job | None:
        """A Job for a stream entry; an entry whose payload is not JSON goes to the dead letters."""
        eid = entry_id.decode()
        job_id = fields.get(b"i", entry_id).decode()
        attempt = int(fields.get(b"a", b"1")) + deliveries - 1
        enqueued = float(fields[b"t"]) if b"t" in fields else int(eid.split("-")[0]) / 1000
        text = fields.get(b"d", b"")
        job = Job(job_id, None, attempt, queue, enqueued, receipt=(eid, consumer, text))
        try:
            job.data = decode_payload(text.decode())  # str: json skips guessing the encoding
        except ValueError as exc:
            self.dead(job, f"payload is not valid JSON: {exc}")
            return None
        return job

    def _job_args(self, job: Job) -> list[Any]:
        eid, consumer, text = job.receipt
        return [GROUP, eid, consumer, job.id, text]

    def ack_many(self, jobs: list[Job]) -> None:
        for queue in sorted({job.queue for job in jobs}):
            key = stream_key(queue)
            ids = [job.receipt[0] for job in jobs if job.queue == queue]
            self._call("ack", lambda key=key, ids=ids: self._s["ACK_MANY"](keys=[key, key + ":done:"],
                                                                          args=[GROUP, *ids]))
            jobs[:] = [job for job in jobs if job.queue != queue]

    def retry(self, job: Job, delay: float, error_text: str) -> None:
        key = stream_key(job.queue)
        args = [*self._job_args(job), job.attempt + 1, job.enqueued_at, error_text, max(0.0, delay)]
        self._call("retry", lambda: self._s["RETRY"](keys=[key, key + ":delayed"], args=args))

    def dead(self, job: Job, error_text: str) -> None:
        key = stream_key(job.queue)
        args = [*self._job_args(job), job.attempt, job.enqueued_at, error_text]
        self._call("dead", lambda: self._s["DEAD"](keys=[key, key + ":dead"], args=args))

    def hand_back_many(self, jobs: list[Job]) -> None:
        if not jobs:
            return

        def hand_back_all() -> None:  # one round trip; each script is a no-op when run twice
            pipe = self._client().pipeline(transaction=False)
            for job in jobs:
                args = [*self._job_args(job), job.attempt, job.enqueued_at]
                self._s["HAND_BACK"](keys=[stream_key(job.queue)], args=args, client=pipe)
            pipe.execute()
        self._call("hand back", hand_back_all)

    # --- seeing and handling ---------------------------------------------------------------

    def stats(self, queue: str | None = None) -> dict[str, dict[str, Any]]:
        return self._call("stats", lambda: self._stats(queue))  # type: ignore[return-value]

    def _stats(self, queue: str | None) -> dict[str, dict[str, Any]]:
        r = self._client()
        names = [check_queue_name(queue)] if queue else sorted(n.decode() for n in r.smembers(QUEUES))
        now = int(r.time()[0])
        pipe = r.pipeline(transaction=False)
        for name in names:
            key = stream_key(name)
            pipe.xlen(key)
            pipe.zcard(key + ":delayed")
            pipe.hlen(key + ":dead")
            pipe.mget([f"{key}:done:{s}" for s in range(now - 59, now + 1)])
            pipe.xpending(key, GROUP)
        replies = pipe.execute(raise_on_error=False)
        out = {}
        for i, name in enumerate(names):
            length, delayed, dead, done, pending = replies[5 * i: 5 * i + 5]
            pending = pending if isinstance(pending, dict) else {"pending": 0, "consumers": []}
            out[name] = {
                "waiting": length - pending["pending"], "delayed": delayed, "running": pending["pending"],
                "done_last_minute": sum(int(n) for n in done if n), "dead": dead,
                "consumers": {c["name"].decode(): c["pending"] for c in pending["consumers"]},
            }
        return out

    def dead_jobs(self, queue: str) -> list[DeadJob]:
        key = stream_key(check_queue_name(queue)) + ":dead"
        raw = self._call("dead jobs", lambda: self._client().hvals(key))
        jobs = []
        for text in raw:  # type: ignore[union-attr]
            rec = json.loads(text)
            jobs.append(DeadJob(rec["i"], rec["d"], int(rec["a"]), queue, float(rec["t"]), float(rec["f"]),
                                rec.get("e", "")))
        return sorted(jobs, key=lambda j: (j.failed_at, j.id))

    def retry_dead(self, queue: str, ids: Iterable[str] | None = None) -> list[str]:
        key = stream_key(check_queue_name(queue))
        args = [] if ids is None else list(ids)
        if ids is not None and not args:
            return []
        moved = self._call("retry dead", lambda: self._s["RETRY_DEAD"](keys=[key, key + ":dead"], args=args))
        return sorted(m.decode() for m in moved)  # type: ignore[union-attr]

    def purge(self, queue: str) -> int:
        key = stream_key(check_queue_name(queue))

        def purge_all() -> int:
            pipe = self._client().pipeline(transaction=True)
            pipe.xlen(key)
            pipe.zcard(key + ":delayed")
            pipe.hlen(key + ":dead")
            pipe.delete(key, key + ":delayed", key + ":dead")
            pipe.srem(QUEUES, queue)
            counts = pipe.execute()
            return sum(counts[:3])
        count = self._call("purge", purge_all)
        self._groups.discard(queue)
        return count  # type: ignore[return-value]


def _pairs(flat: Any) -> dict[bytes, bytes]:
    """Stream entry fields from a flat [k, v, k, v] list (or a dict already)."""
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))
