"""What one pool costs, per worker and in the master: for before/after runs of a change.

    .venv/bin/python bench/child_cost.py [--workers 500] [--reps 3] [--base DIR]

Starts `tprocess start -d` with bench/workload.py's idle task (and, with --base, the same
from another source tree first on PYTHONPATH, interleaved rep by rep), waits until every
worker has begun its first task, then reads from /proc: each worker's minor page faults
(stat field 10: copy-on-write and first touches since fork), Private_Dirty and Pss
(smaps_rollup), the master's VmRSS and its CPU time so far; then times `tprocess stop`.
Prints medians per variant. Signals nothing itself: the pools are stopped by the command.
"""

from __future__ import annotations

import argparse
import os
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
TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rpartition(")")[2].split()


def rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def one_pool(folder: str, workers: int, env_extra: dict[str, str]) -> dict[str, float]:
    name = f"cc{uuid.uuid4().hex[:8]}"
    records = os.path.join(folder, f"{name}.rec")
    env = dict(os.environ, BENCH_RECORDS=records, BENCH_MODE="idle", **env_extra)
    cmd = [TPROCESS, "start", TASK, "-n", str(workers), "-d", "--name", name,
           "--log-file", os.path.join(folder, f"{name}.log")]
    t0 = time.monotonic_ns()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    deadline = time.monotonic() + 300
    while len(starts := first_starts(records)) < workers:
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for first tasks")
        time.sleep(0.005)
    start_s = (max(starts.values()) - t0) / 1e9
    out = subprocess.run([TPROCESS, "status", "--json", "--name", name], env=env,
                         capture_output=True, text=True).stdout
    master = int(out.split('"pid": ', 1)[1].split(",", 1)[0])
    kids = children_of(master)
    faults, dirty, pss = [], [], []
    for pid in kids:
        faults.append(int(stat_fields(pid)[7]))
        r = rollup(pid)
        dirty.append(r["Private_Dirty"])
        pss.append(r["Pss"])
    fields = stat_fields(master)
    master_cpu = (int(fields[11]) + int(fields[12])) / TICK
    master_rss = rollup(master)["Rss"]
    t1 = time.monotonic()
    subprocess.run([TPROCESS, "stop", "--name", name], env=env, check=True, capture_output=True, timeout=300)
    stop_s = time.monotonic() - t1
    med = statistics.median
    return {"start_s": start_s, "stop_s": stop_s, "minflt": med(faults), "priv_dirty_kib": med(dirty),
            "pss_total_mib": sum(pss) / 1024, "master_rss_mib": master_rss / 1024,
            "master_cpu_s": master_cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--base", help="another source tree (its src/) run interleaved as 'base'")
    args = ap.parse_args()
    variants = {"current": {}}
    if args.base:
        variants = {"base": {"PYTHONPATH": os.path.abspath(args.base)}, "current": {}}
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.reps):
            for v, extra in variants.items():
                results[v].append(one_pool(folder, args.workers, extra))
    for v, runs in results.items():
        figures = "  ".join(f"{k} {statistics.median(r[k] for r in runs):.3f}" for k in runs[0])
        print(f"{v:8} N={args.workers}: {figures}")


if __name__ == "__main__":
    main()
