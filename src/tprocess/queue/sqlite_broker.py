"""The embedded broker: one SQLite file in WAL mode, shared by the processes of one machine.

Times that decide delivery (when a job becomes visible, when a lease ends) are CLOCK_MONOTONIC,
which is one clock for every process of a machine and never jumps; the file remembers the boot it
was written in, and after a reboot the pending times are moved onto the new boot's clock.
A running job's `visible_at` is the end of its lease: the same index finds due jobs and jobs
whose consumer died. Each process opens its own connection on first use (never across a fork).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .broker import Broker
from .jobs import BrokerError, DeadJob, Job, check_queue_name, decode_payload
from .waiting import FileWatch, wait_for_fds

WAITING, RUNNING, DEAD = 0, 1, 2
BUSY_TIMEOUT_MS = 10_000
MAX_WAIT_SLICE = 1.0  # re-check at least this often even if no write was seen (a missed inotify event)
POLL_WITHOUT_INOTIFY = 0.05
DONE_KEEP_S = 120  # per-second "done" counters older than this are pruned

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    data TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    enqueued_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    consumer TEXT,
    token INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    failed_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (queue, visible_at, id) WHERE state < 2;
CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (queue, failed_at) WHERE state = 2;
CREATE TABLE IF NOT EXISTS done (
    queue TEXT NOT NULL, second INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (queue, second)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""

DUE = f"""
SELECT id FROM jobs WHERE queue = ? AND state < {DEAD} AND visible_at <= ? ORDER BY visible_at, id LIMIT ?
"""

NEXT_DUE = f"SELECT MIN(visible_at) FROM jobs WHERE queue = ? AND state < {DEAD}"

CLAIM = f"""
UPDATE jobs SET state = {RUNNING}, attempt = attempt + (state = {RUNNING}), visible_at = ?, consumer = ?,
    token = token + 1
WHERE id IN (%s)
RETURNING id, data, attempt, enqueued_at, token
"""

_inherited: list[sqlite3.Connection] = []  # a parent's connections: kept, never used or closed after fork


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


class SQLiteBroker(Broker):
    def __init__(self, path: str) -> None:
        self.path = path
        self.url = "sqlite://" + path
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._watch: FileWatch | None = None
        self._next_prune = 0.0

    # --- connection -------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3 errors become one BrokerError line naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise BrokerError(f"{self.url}: {exc}{self._why_not_writable()}") from None

    def _why_not_writable(self) -> str:
        """SQLite says "unable to open database file" or "attempt to write a readonly database":
        say why, when it is the file system or the permissions."""
        folder = os.path.dirname(self.path) or "."
        try:
            if os.statvfs(folder).f_flag & os.ST_RDONLY:
                return f" (the file system of {folder!r} is read-only)"
        except OSError:
            return ""
        if not os.access(folder, os.W_OK):
            return f" (no permission to write in {folder!r})"
        return ""

    def _db(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:  # forked: the parent's connection must not be touched here
            _inherited.append(self._conn)
            if self._watch is not None:
                self._watch.close()  # the child's copy of the parent's inotify descriptor
            self._conn, self._watch = None, None
        folder = os.path.dirname(self.path) or "."
        if not os.path.isdir(folder):
            raise BrokerError(f"{self.url}: folder {folder!r} does not exist")
        with self._errors():
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise BrokerError(f"{self.url}: the file system does not support SQLite's WAL mode")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(SCHEMA)
            self._rebase_after_reboot(conn)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _rebase_after_reboot(self, conn: sqlite3.Connection) -> None:
        """Move pending times onto this boot's monotonic clock; leases of a past boot are over."""
        boot, now, wall = _boot_id(), time.monotonic(), time.time()
        row = conn.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
        if row and row[0].split()[0] == boot:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
            if not (row and row[0].split()[0] == boot):
                old_offset = float(row[0].split()[1]) if row else wall - now
                conn.execute(
                    f"UPDATE jobs SET visible_at = CASE WHEN state = {RUNNING} THEN :now"
                    " ELSE MAX(:now, visible_at + :offset - :wall + :now) END WHERE state < 2",
                    {"now": now, "offset": old_offset, "wall": wall})
                conn.execute("DELETE FROM done")
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?)", (f"{boot} {wall - now}",))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        with self._errors():
            if durable:  # a put must survive a power loss, not only a crash
                conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous = NORMAL")

    def check(self) -> None:
        self._db()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        elif self._conn is not None:  # a parent's, after fork: never closed here (nor by the gc)
            _inherited.append(self._conn)
        self._conn = None

    # --- producing --------------------------------------------------------------------

    def put_encoded(self, queue: str, payloads: list[str], delay: float = 0) -> list[str]:
        if not payloads:
            return []
        wall, visible = time.time(), time.monotonic() + max(0.0, delay)
        with self._transaction(durable=True) as conn:
            conn.executemany(
                "INSERT INTO jobs (queue, data, enqueued_at, visible_at) VALUES (?, ?, ?, ?)",
                ((queue, payload, wall, visible) for payload in payloads))
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        # one transaction under the write lock: AUTOINCREMENT ids are consecutive
        return [str(i) for i in range(last - len(payloads) + 1, last + 1)]

    # --- consuming --------------------------------------------------------------------

    def fetch_many(self, queue: str, consumer: str, count: int, timeout_s: float, job_timeout: float,
                   wake_fd: int | None = None, acks: list[Job] | None = None) -> list[Job]:
        check_queue_name(queue)
        deadline = time.monotonic() + timeout_s
        acks = acks if acks is not None else []
        while True:
            jobs, next_due = self._try_fetch(queue, consumer, count, job_timeout, acks)
            if jobs:
                return jobs
            now = time.monotonic()
            if now >= deadline:
                return []
            watch = self._file_watch()
            slice_s = MAX_WAIT_SLICE if watch.fileno() is not None else POLL_WITHOUT_INOTIFY
            wait = min(deadline - now, slice_s, max(0.0, next_due - now) if next_due else slice_s)
            ready = wait_for_fds([watch.fileno(), wake_fd], wait)
            if wake_fd is not None and wake_fd in ready:
                return []
            if watch.fileno() in ready:
                watch.drain()

    def _file_watch(self) -> FileWatch:
        if self._watch is None:
            self._db()
            self._watch = FileWatch(self.path + "-wal")
        return self._watch

    def _try_fetch(self, queue: str, consumer: str, count: int, job_timeout: float,
                   acks: list[Job]) -> tuple[list[Job], float | None]:
        """The done jobs deleted and up to `count` due jobs claimed, in one write transaction; with none
        due, when the next one is. Bad payloads are dead-lettered."""
        while True:
            now = time.monotonic()
            if not acks:  # nothing to send: a read first, so that idle consumers never take the write lock
                due = self._next_due(queue)
                if due is None or due > now:
                    return [], due
            with self._transaction() as conn:
                if acks:
                    self._delete_done(conn, acks)
                ids = [row[0] for row in conn.execute(DUE, (queue, now, count))]
                if not ids:
                    due = conn.execute(NEXT_DUE, (queue,)).fetchone()[0]
                    rows = []
                else:
                    rows = conn.execute(CLAIM % ",".join("?" * len(ids)),
                                        (now + job_timeout, consumer, *ids)).fetchall()
            acks.clear()
            if not rows:
                return [], due
            order = {job_id: n for n, job_id in enumerate(ids)}  # RETURNING has no order of its own
            jobs = [job for row in sorted(rows, key=lambda row: order[row[0]])
                    if (job := self._to_job(queue, row)) is not None]
            if jobs:
                return jobs, None

    def _next_due(self, queue: str) -> float | None:
        """When the queue's next job is due (monotonic), None if it has none: a read, no lock held."""
        conn = self._db()
        with self._errors():
            return conn.execute(NEXT_DUE, (queue,)).fetchone()[0]  # type: ignore[no-any-return]

    def _to_job(self, queue: str, row: tuple[Any, ...]) -> Job | None:
        job_id, text, attempt, enqueued_at, token = row
        job = Job(str(job_id), None, attempt, queue, enqueued_at, receipt=(job_id, token))
        try:
            job.data = decode_payload(text)
        except ValueError as exc:
            self.dead(job, f"payload is not valid JSON: {exc}")
            return None
        return job

    def _delete_done(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """Inside a write transaction: the done jobs deleted and counted (a job whose lease passed to
        another consumer meanwhile has a new token: it is left alone)."""
        second = int(time.monotonic())
        for queue in {job.queue for job in jobs}:
            deleted = conn.executemany("DELETE FROM jobs WHERE id = ? AND token = ?",
                                       [job.receipt for job in jobs if job.queue == queue]).rowcount
            if deleted:
                conn.execute("INSERT INTO done VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET n = n + excluded.n",
                             (queue, second, deleted))
        if second >= self._next_prune:
            self._next_prune = second + 10
            conn.execute("DELETE FROM done WHERE second < ?", (second - DONE_KEEP_S,))

    def ack_many(self, jobs: list[Job]) -> None:
        if jobs:
            with self._transaction() as conn:
                self._delete_done(conn, jobs)
            jobs.clear()

    def retry(self, job: Job, delay: float, error_text: str) -> None:
        job_id, token = job.receipt
        with self._errors():
            self._db().execute(
                f"UPDATE jobs SET state = {WAITING}, attempt = attempt + 1, visible_at = ?, consumer = NULL,"
                " error = ? WHERE id = ? AND token = ?",
                (time.monotonic() + max(0.0, delay), error_text, job_id, token))

    def dead(self, job: Job, error_text: str) -> None:
        job_id, token = job.receipt
        with self._errors():
            self._db().execute(
                f"UPDATE jobs SET state = {DEAD}, consumer = NULL, error = ?, failed_at = ?"
                " WHERE id = ? AND token = ?", (error_text, time.time(), job_id, token))

    def hand_back_many(self, jobs: list[Job]) -> None:
        if jobs:  # not started: same attempt, and first in line again
            with self._transaction() as conn:
                conn.executemany(f"UPDATE jobs SET state = {WAITING}, visible_at = 0, consumer = NULL"
                                 " WHERE id = ? AND token = ?", [job.receipt for job in jobs])

    # --- seeing and handling ------------------------------------------------------------

    def stats(self, queue: str | None = None) -> dict[str, dict[str, Any]]:
        only, args = ("AND queue = :queue", {"queue": queue}) if queue else ("", {})
        if queue:
            check_queue_name(queue)
        now = time.monotonic()
        conn = self._db()
        out: dict[str, dict[str, Any]] = {}
        if queue:
            out[queue] = _empty_stats()
        with self._errors():
            for name, waiting, delayed, running, dead in conn.execute(
                    "SELECT queue, SUM(state = 0 AND visible_at <= :now),"
                    " SUM(state = 0 AND visible_at > :now),"
                    f" SUM(state = 1), SUM(state = 2) FROM jobs WHERE 1 {only} GROUP BY queue",
                    {**args, "now": now}):
                out.setdefault(name, _empty_stats()).update(
                    waiting=waiting, delayed=delayed, running=running, dead=dead)
            for name, done in conn.execute(
                    f"SELECT queue, SUM(n) FROM done WHERE second > :since {only}"
                    " GROUP BY queue", {**args, "since": int(now) - 60}):
                out.setdefault(name, _empty_stats())["done_last_minute"] = done
            for name, consumer, count in conn.execute(
                    f"SELECT queue, consumer, COUNT(*) FROM jobs WHERE state = 1"
                    f" {only} GROUP BY queue, consumer", args):
                out.setdefault(name, _empty_stats())["consumers"][consumer] = count
        return dict(sorted(out.items()))

    def dead_jobs(self, queue: str) -> list[DeadJob]:
        check_queue_name(queue)
        with self._errors():
            rows = self._db().execute(
                f"SELECT id, data, attempt, enqueued_at, failed_at, error FROM jobs"
                f" WHERE queue = ? AND state = {DEAD} ORDER BY failed_at, id", (queue,)).fetchall()
        return [DeadJob(str(i), data, attempt, queue, enq, failed or 0.0, error or "")
                for i, data, attempt, enq, failed, error in rows]

    def retry_dead(self, queue: str, ids: Iterable[str] | None = None) -> list[str]:
        check_queue_name(queue)
        wanted = None if ids is None else [int(i) for i in ids if str(i).isdigit()]
        moved: list[str] = []
        with self._transaction(durable=True) as conn:
            sql = (f"UPDATE jobs SET state = {WAITING}, attempt = 1, visible_at = :now, failed_at = NULL"
                   f" WHERE queue = :queue AND state = {DEAD}")
            if wanted is None:
                moved += [str(r[0]) for r in conn.execute(sql + " RETURNING id",
                                                          {"now": time.monotonic(), "queue": queue})]
            for job_id in wanted or ():
                args = {"now": time.monotonic(), "queue": queue, "id": job_id}
                moved += [str(r[0]) for r in conn.execute(sql + " AND id = :id RETURNING id", args)]
        return sorted(moved, key=int)

    def purge(self, queue: str) -> int:
        check_queue_name(queue)
        with self._transaction() as conn:
            count = conn.execute("DELETE FROM jobs WHERE queue = ?", (queue,)).rowcount
            conn.execute("DELETE FROM done WHERE queue = ?", (queue,))
        return count


def _empty_stats() -> dict[str, Any]:
    return {"waiting": 0, "delayed": 0, "running": 0, "done_last_minute": 0, "dead": 0, "consumers": {}}
