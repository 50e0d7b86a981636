"""The producing side, in a process of its own (the env picks the system's settings):

    python producer.py KEY URL bulk KIND COUNT       # put COUNT jobs with the system's bulk API
    python producer.py KEY URL probe COUNT RECORDS   # latency probes, one job at a time

Prints one JSON line: {"seconds": ...} for bulk; {"latencies_ns": [...], "timeouts": N} for probe.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from work import payloads

WARMUP = 10
WAIT_EACH = 0.02  # a probe waits this long for its record before the next one is put anyway
SPACING = 0.002


def bulk_put(key: str, url: str) -> Callable[[list[dict[str, Any]]], None]:
    if key == "tprocess":
        from tprocess import Queue

        return Queue(url, "bench").put_many
    if key == "floor":
        import redis

        r = redis.Redis.from_url(url)

        def put_many(items: list[dict[str, Any]]) -> None:
            pipe = r.pipeline(transaction=False)
            for item in items:
                pipe.xadd("floor", {"d": json.dumps(item)})
            pipe.execute()

        return put_many
    return __import__(f"sys_{key}").put_many


def one_put(key: str, url: str) -> Callable[[dict[str, Any]], Any]:
    if key == "tprocess":
        from tprocess import Queue

        return Queue(url, "bench").put
    if key == "floor":
        import redis

        r = redis.Redis.from_url(url)
        return lambda item: r.xadd("floor", {"d": json.dumps(item)})
    if key == "arq":
        import asyncio

        from arq import create_pool
        from sys_arq import REDIS

        loop = asyncio.new_event_loop()
        pool = loop.run_until_complete(create_pool(REDIS))
        return lambda item: loop.run_until_complete(pool.enqueue_job("job", item))
    module = __import__(f"sys_{key}")
    if key == "celery":
        return lambda item: module.job.apply_async((item,))
    if key == "rq":
        queue = module.queue()
        return lambda item: module.put_many([item], queue)
    if key == "dramatiq":
        return module.job.send
    return module.job  # huey: calling the task enqueues it


def bulk(key: str, url: str, kind: str, count: int) -> dict[str, float]:
    put_many = bulk_put(key, url)
    items = payloads(kind, count)
    started = time.monotonic()
    put_many(items)
    return {"seconds": time.monotonic() - started}


def probe(key: str, url: str, count: int, records: str, budget: float) -> dict[str, Any]:
    put = one_put(key, url)
    seen = _Lines(records)
    deadline = time.monotonic() + 120
    put({"k": "l", "t": time.monotonic_ns()})  # the first job tells the workers are up
    while seen.count() < 1:
        if time.monotonic() > deadline:
            return {"latencies_ns": [], "timeouts": count, "error": "no worker took a job in 120 s"}
        time.sleep(0.005)
    timeouts = 0
    ends = time.monotonic() + budget
    for n in range(WARMUP + count):
        put({"k": "l", "t": time.monotonic_ns()})
        waited = time.monotonic() + WAIT_EACH
        while seen.count() < n + 2 and time.monotonic() < waited:
            time.sleep(0.0002)
        if seen.count() < n + 2:
            timeouts += 1
        time.sleep(SPACING)
        if time.monotonic() > ends:  # slow systems: fewer probes, said in the report
            break
    settle = time.monotonic() + 5
    while seen.count() < n + 2 and time.monotonic() < settle:
        time.sleep(0.01)
    pairs = sorted(tuple(map(int, ln.split())) for ln in seen.lines())[1 + WARMUP :]  # by put time
    return {
        "latencies_ns": [start - put for put, start in pairs],
        "timeouts": timeouts,
        "probes": n + 1 - WARMUP,
    }


class _Lines:
    """The records file's complete lines, read incrementally."""

    def __init__(self, path: str) -> None:
        self.path, self.offset, self.buffer, self.done = path, 0, b"", []

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        parts = (self.buffer + data).split(b"\n")
        self.buffer = parts.pop()
        self.done += [p.decode() for p in parts if p]
        return len(self.done)

    def lines(self) -> list[str]:
        self.count()
        return self.done


def main() -> None:
    key, url, what = sys.argv[1:4]
    if what == "bulk":
        result = bulk(key, url, sys.argv[4], int(sys.argv[5]))
    else:
        result = probe(key, url, int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # some clients keep threads (celery's producer pool): do not wait for them


if __name__ == "__main__":
    main()
