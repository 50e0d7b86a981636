"""The contestants: how each one puts jobs in bulk, puts one job, and starts its worker processes.

Every contestant runs in the bench venv (bench/.work/venv) against the harness's redis-server (its
own database number), with 4 worker processes; `workload` is "throughput", "latency", "async" or
"kill". The task is work.py's `handle` (or `handle_async`) in every case.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
PROCS = 4
ASYNC_CONCURRENCY = 100


@dataclass
class Contestant:
    name: str
    how: str  # one line for the report
    package: str  # the distribution whose version is reported; producer.py's key
    workloads: tuple[str, ...] = ("throughput", "latency", "kill")
    env: dict[str, str] = field(default_factory=dict)

    def commands(self, url: str, workload: str, folder: str) -> list[list[str]]:
        raise NotImplementedError

    def prepare(self, url: str) -> None:
        """Anything the broker needs before jobs are put (the floor's consumer group)."""


class Celery(Contestant):
    def commands(self, url, workload, folder):
        return [
            [
                f"{BIN}/celery",
                "-A",
                "sys_celery",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(PROCS),
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"qb{os.getpid()}@%h",
            ]
        ]


class RQ(Contestant):
    def commands(self, url, workload, folder):
        one = [f"{BIN}/rq", "worker", "-w", "rq.worker.SimpleWorker", "-u", url, "-q", "bench"]
        return [[*one, "-n", f"qb-{os.getpid()}-{i}"] for i in range(PROCS)]


class Dramatiq(Contestant):
    def commands(self, url, workload, folder):
        threads = ASYNC_CONCURRENCY if workload == "async" else 8  # 8: dramatiq's default
        return [[f"{BIN}/dramatiq", "sys_dramatiq", "-p", str(PROCS), "-t", str(threads), "-P", HERE]]


class Huey(Contestant):
    def commands(self, url, workload, folder):
        if workload == "async":  # 4 consumer processes of 100 threads each
            return [
                [f"{BIN}/huey_consumer", "sys_huey.huey", "-k", "thread", "-w", str(ASYNC_CONCURRENCY), "-q"]
                for _ in range(PROCS)
            ]
        return [[f"{BIN}/huey_consumer", "sys_huey.huey", "-k", "process", "-w", str(PROCS), "-q"]]


class Arq(Contestant):
    def commands(self, url, workload, folder):
        return [[f"{BIN}/arq", "sys_arq.WorkerSettings"] for _ in range(PROCS)]


class TProcess(Contestant):
    """`tprocess start -c FILE` in the foreground, one queue group of 4 workers."""

    def __init__(self, name: str, broker: str, how: str, env: dict[str, str] | None = None) -> None:
        super().__init__(name, how, "tprocess", ("throughput", "latency", "async", "kill"), env or {})
        self.broker = broker  # "redis" or "sqlite"

    def url(self, redis_url: str, folder: str) -> str:
        if self.broker == "redis":
            return redis_url
        return "sqlite://" + os.path.join(folder, "queue.sqlite3")

    def commands(self, url, workload, folder):
        conf = os.path.join(folder, "tprocess.toml")
        task = "sys_tprocess.py:work_async" if workload == "async" else "sys_tprocess.py:work"
        lines = [
            f"broker = {json.dumps(url)}",
            "",
            "[groups.bench]",
            f"task = {json.dumps(os.path.join(HERE, task))}",
            f"workers = {PROCS}",
            'queue = "bench"',
        ]
        if workload == "async":
            lines.append(f"concurrency = {ASYNC_CONCURRENCY}")
        if workload == "kill":
            lines.append("job_timeout = 20")  # the default is 300 s: a killed job would come back after 5 min
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        name = f"qb{os.getpid()}{self.broker}{workload[:2]}{'b' if self.env else ''}"
        return [
            [
                f"{BIN}/tprocess",
                "start",
                "-c",
                conf,
                "--name",
                name,
                "--log-file",
                os.path.join(folder, "tprocess.log"),
            ]
        ]


class Floor(Contestant):
    def commands(self, url, workload, folder):
        extra = [str(ASYNC_CONCURRENCY)] if workload == "async" else []
        return [[sys.executable, os.path.join(HERE, "floor.py"), url, str(PROCS), *extra]]

    def prepare(self, url):
        import redis

        r = redis.Redis.from_url(url)
        r.xgroup_create("floor", "g", id="0", mkstream=True)
        r.close()


def before_and_after() -> list[Contestant]:
    """With QB_BEFORE_SRC=DIR (a `src` folder of an older tprocess, e.g. from `git archive`), that
    version runs too, as "tprocess before (...)", interleaved with the current one: a before/after
    measured side by side in one run."""
    src = os.environ.get("QB_BEFORE_SRC")
    if not src:
        return []
    env = {"PYTHONPATH": f"{os.path.abspath(src)}:{HERE}"}
    return [TProcess(f"tprocess before ({label})", broker, f"the same, tprocess from {src}", env)
            for label, broker in (("Redis", "redis"), ("SQLite", "sqlite"))]


def contestants() -> list[Contestant]:
    return [*before_and_after(),
        TProcess(
            "tprocess (Redis)", "redis", 'tprocess start -c FILE: one group, workers = 4, queue = "bench"'
        ),
        TProcess("tprocess (SQLite)", "sqlite", 'the same with broker = "sqlite:///PATH"'),
        Floor(
            "floor",
            "bench/queues/floor.py: 4 forked processes, XACK + XREADGROUP COUNT 64 in one round trip",
            "floor",
            ("throughput", "latency", "async"),
        ),
        Celery(
            "Celery acks_late",
            "celery worker -P prefork -c 4; acks_late, reject_on_worker_lost, prefetch_multiplier=1",
            "celery",
            env={"QB_CELERY": "late"},
        ),
        Celery(
            "Celery default",
            "celery worker -P prefork -c 4; Celery's defaults (ack on receipt, prefetch 4)",
            "celery",
            env={"QB_CELERY": "default"},
        ),
        RQ("RQ", "4 x rq worker -w rq.worker.SimpleWorker", "rq"),
        Dramatiq(
            "dramatiq",
            "dramatiq -p 4 (-t 8, its default; -t 100 for async), RedisBroker",
            "dramatiq",
            ("throughput", "latency", "async", "kill"),
        ),
        Huey(
            "huey",
            "huey_consumer -k process -w 4 (async: 4 consumers x -k thread -w 100), RedisHuey",
            "huey",
            ("throughput", "latency", "async", "kill"),
        ),
        Arq(
            "arq",
            "4 x arq WorkerSettings (max_jobs 10, its default; 100 for async)",
            "arq",
            ("throughput", "latency", "async", "kill"),
        ),
    ]
