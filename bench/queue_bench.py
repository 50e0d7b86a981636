"""Queue throughput, each broker: put_many (jobs/s) and one consumer's fetch + ack (jobs/s).

    .venv/bin/python bench/queue_bench.py [--jobs N]

Starts its own redis-server on a free 127.0.0.1 port with a scratch folder and stops it by pid.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

from tprocess.queue import open_broker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(folder: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    broker = open_broker(url, retry_for=10)
    broker.check()  # retried until the server answers
    broker.close()
    return proc, url


def measure(url: str, jobs: int) -> dict[str, float]:
    broker = open_broker(url)
    items = [{"ip": f"10.0.{n // 256 % 256}.{n % 256}", "n": n} for n in range(jobs)]
    started = time.monotonic()
    for first in range(0, jobs, 10_000):
        broker.put_many("bench", items[first:first + 10_000])
    put_rate = jobs / (time.monotonic() - started)
    started = time.monotonic()
    done = 0
    while (job := broker.fetch("bench", "bench:consumer", 0.5, 300)) is not None:
        broker.ack(job)
        done += 1
    consume_rate = done / (time.monotonic() - started)
    assert done == jobs, (done, jobs)
    broker.close()
    return {"put_many": put_rate, "fetch_ack": consume_rate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50_000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="tprocess-qbench-")
    proc, redis_url = _start_redis(folder)
    try:
        for name, url in (("sqlite", f"sqlite://{os.path.join(folder, 'q.sqlite3')}"), ("redis", redis_url)):
            rates = measure(url, args.jobs)
            print(f"{name:7} put_many {rates['put_many']:>9,.0f} jobs/s   "
                  f"fetch+ack (1 consumer) {rates['fetch_ack']:>8,.0f} jobs/s   ({args.jobs:,} jobs)")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
