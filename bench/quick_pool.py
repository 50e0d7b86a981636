"""A quick look at tprocess alone: start of N workers, respawn after SIGKILL, stop.

    .venv/bin/python bench/quick_pool.py [--workers 100] [--reps 3] [--kills 20]

Runs the real command (`tprocess start -d`) with bench/workload.py's idle task and
reads its records (`S PID MONOTONIC_NS` at each task start). Figures are medians:
- start: from running `start -d` until every worker has begun its first task;
- respawn: from SIGKILL of a worker (our own pool's, by pid) until its replacement
  begins its first task;
- stop: how long `tprocess stop` takes.
Signals only pids it read from its own instance's master (a unique name per run).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from procutil import children_of, first_starts

HERE = os.path.dirname(os.path.abspath(__file__))
TPROCESS = os.path.join(os.path.dirname(sys.executable), "tprocess")
TASK = os.path.join(HERE, "workload.py") + ":task"


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise SystemExit("timed out")


class Pool:
    def __init__(self, folder: str, workers: int) -> None:
        self.name = f"qb{uuid.uuid4().hex[:8]}"
        self.records = os.path.join(folder, f"{self.name}.rec")
        self.log = os.path.join(folder, f"{self.name}.log")
        self.workers = workers
        self.env = dict(os.environ, BENCH_RECORDS=self.records, BENCH_MODE="idle")

    def run(self, *args: str) -> float:
        t0 = time.monotonic()
        result = subprocess.run([TPROCESS, *args, "--name", self.name], env=self.env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise SystemExit(f"{args[0]} failed: {result.stderr}")
        return time.monotonic() - t0

    def start(self) -> tuple[float, float]:
        """(start -d returned, every worker in its first task), seconds."""
        t0 = time.monotonic_ns()
        returned = self.run("start", TASK, "-n", str(self.workers), "-d", "--log-file", self.log)
        last = wait_until(lambda: len(s := first_starts(self.records)) >= self.workers and max(s.values()))
        return returned, (last - t0) / 1e9

    def master_pid(self) -> int:
        out = subprocess.run([TPROCESS, "status", "--json", "--name", self.name],
                             capture_output=True, text=True).stdout
        import json

        return json.loads(out)["master"]["pid"]

    def respawn(self, master: int) -> float:
        known = first_starts(self.records)
        # the oldest worker: one killed within min_uptime of its start would back off
        victim = min(children_of(master), key=lambda pid: known.get(pid, 1 << 62))
        t0 = time.monotonic_ns()
        os.kill(victim, signal.SIGKILL)
        new = wait_until(lambda: [ns for pid, ns in first_starts(self.records).items() if pid not in known])
        return (min(new) - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kills", type=int, default=20)
    args = ap.parse_args()
    starts, readies, stops, respawns = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.reps):
            pool = Pool(folder, args.workers)
            returned, ready = pool.start()
            starts.append(returned)
            readies.append(ready)
            stops.append(pool.run("stop"))
        pool = Pool(folder, 10)
        pool.start()
        master = pool.master_pid()
        for _ in range(args.kills):
            respawns.append(pool.respawn(master))
            time.sleep(0.15)
        pool.run("stop")
    med = statistics.median
    print(f"start -d of {args.workers}: {med(starts):.3f} s (returns; min {min(starts):.3f}), "
          f"{med(readies):.3f} s (all in a task); stop {med(stops):.3f} s; "
          f"respawn {med(respawns) * 1000:.1f} ms "
          f"(min {min(respawns) * 1000:.1f}, max {max(respawns) * 1000:.1f}, n={len(respawns)})")


if __name__ == "__main__":
    main()
