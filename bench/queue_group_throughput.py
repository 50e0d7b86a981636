"""Throughput of a queue group through the real command: N empty jobs, W workers, per broker.

    python bench/queue_group_throughput.py [--jobs 20000] [--workers 4] [--runs 3] [--async-jobs 2000]

Each run: the jobs are enqueued first, then the clock starts, `tprocess start -d` runs, and the
clock stops when the broker has no job waiting or running (the last acknowledgement). The brokers
are measured interleaved (sqlite, redis, sqlite, ...), medians printed. The async run: jobs that
await 50 ms, 4 workers x concurrency 100. Needs redis-server on PATH (a private one is started).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from tprocess.queue import open_broker

TPROCESS = str(Path(sys.executable).parent / "tprocess")
TASKS = '''
import asyncio

def empty(ctx, job):
    pass

async def io_50ms(ctx, job):
    await asyncio.sleep(0.05)
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(folder: Path, broker: str, jobs: int, workers: int, task: str, concurrency: int) -> float:
    name = f"qbench{os.getpid()}"
    (folder / "tasks.py").write_text(TASKS)
    (folder / "tprocess.toml").write_text(
        f'name = "{name}"\nbroker = "{broker}"\n[groups.q]\ntask = "tasks.py:{task}"\nqueue = "q"\n'
        f"workers = {workers}\nconcurrency = {concurrency}\n")
    with open_broker(broker) as b:
        b.purge("q")
        for start in range(0, jobs, 10_000):
            b.put_many("q", [{"n": n} for n in range(start, min(jobs, start + 10_000))])
        began = time.monotonic()
        subprocess.run([TPROCESS, "start", "-c", "tprocess.toml", "-d", "--log-file", str(folder / "log")],
                       cwd=folder, check=True, capture_output=True)
        while True:
            s = b.stats("q")["q"]
            if s["waiting"] == s["running"] == s["delayed"] == 0:
                took = time.monotonic() - began
                break
            time.sleep(0.005)
    subprocess.run([TPROCESS, "stop", "--name", name], check=True, capture_output=True)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--async-jobs", type=int, default=2_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tprocess-qbench-"))
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        brokers = {"sqlite": f"sqlite://{folder}/q.sqlite3", "redis": f"redis://127.0.0.1:{port}/0"}
        results: dict[str, list[float]] = {}
        for _ in range(args.runs):
            for kind, url in brokers.items():
                results.setdefault(f"{kind} sync", []).append(
                    one_run(folder, url, args.jobs, args.workers, "empty", 1))
                results.setdefault(f"{kind} async", []).append(
                    one_run(folder, url, args.async_jobs, 4, "io_50ms", 100))
        for label, times in results.items():
            jobs = args.jobs if "sync" in label and "async" not in label else args.async_jobs
            median = statistics.median(times)
            print(f"{label:13s} {jobs} jobs: median {median:.2f}s ({jobs / median:,.0f} jobs/s, "
                  f"runs {', '.join(f'{t:.2f}' for t in times)})")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
