"""What one worker's fork and exit cost, by what the forking process holds (issue 8).

    .venv/bin/python bench/fork_cost.py [--forks 200] [--pipes 4000]

Each variant runs in a fresh interpreter that imports a set of modules, then (like the
master) collects, returns free C heap to the system and freezes its objects, and forks
--forks children one at a time. A child reads its own minor-fault count, reports it on a
pipe and waits; the parent SIGKILLs it and reaps it. Medians of: the fork() call in the
parent, fork() to the child's report (the child running), the child's minor faults before
its first line of Python, SIGKILL to waitpid() returning (the child's exit), and the
parent's anonymous memory (smaps). The variants:

- bare: what the floor's master imports (importlib.util, select, signal);
- worker code: tprocess.worker and what it imports (what a small fork server would hold);
- master without the command line: the master's modules but not the CLI's (argparse): what a
  master exec'd afresh by `start` would hold;
- master: every module the tprocess master holds at its first fork;
- master + pipes: the same holding --pipes open pipe ends (two per worker: 4,000 at N = 2,000).

Signals only its own children, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {
    "bare": ["importlib.util", "select", "signal"],
    "worker code": ["tprocess.worker"],
    "master without the command line": ["tprocess.supervisor", "tprocess.master", "tprocess.loader"],
    "master": ["tprocess.cli", "tprocess.supervisor", "tprocess.master", "tprocess.loader"],
    "master + pipes": ["tprocess.cli", "tprocess.supervisor", "tprocess.master", "tprocess.loader"],
}

CHILD = r"""
import ctypes, gc, json, os, resource, signal, sys, time
modules, forks, pipes = json.loads(sys.argv[1])
for name in modules:
    __import__(name)
held = []
if pipes:
    resource.setrlimit(resource.RLIMIT_NOFILE, (pipes + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    for _ in range(pipes // 2):
        held += os.pipe()
gc.collect()
ctypes.CDLL(None).malloc_trim(0)
gc.freeze()


def anon_kib():
    total = 0
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Anonymous:"):
                total = int(line.split()[1])
    return total


rows = []
for _ in range(forks):
    r, w = os.pipe()
    t0 = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        fd = os.open("/proc/self/stat", os.O_RDONLY)
        faults = os.read(fd, 4096).rpartition(b")")[2].split()[7]
        os.write(w, b"%d %s" % (time.monotonic_ns(), faults))
        time.sleep(60)
        os._exit(0)
    t1 = time.monotonic_ns()
    os.close(w)
    running, faults = map(int, os.read(r, 100).split())
    os.close(r)
    t2 = time.monotonic_ns()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    t3 = time.monotonic_ns()
    rows.append(((t1 - t0) / 1e6, (running - t0) / 1e6, faults, (t3 - t2) / 1e6))
print(json.dumps({"rows": rows, "anon_kib": anon_kib()}))
"""


def run_variant(modules: list[str], forks: int, pipes: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([modules, forks, pipes])],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    data = json.loads(out)
    med = statistics.median
    rows = data["rows"]
    return {"fork_ms": med(r[0] for r in rows), "running_ms": med(r[1] for r in rows),
            "child_faults": med(r[2] for r in rows), "exit_ms": med(r[3] for r in rows),
            "anon_mib": data["anon_kib"] / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forks", type=int, default=200)
    ap.add_argument("--pipes", type=int, default=4000)
    args = ap.parse_args()
    print("| parent holds | anonymous memory | fork() | fork to child running | child's faults "
          "before its first line | SIGKILL to reaped |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, modules in VARIANTS.items():
        pipes = args.pipes if name.endswith("pipes") else 0
        f = run_variant(modules, args.forks, pipes)
        print(f"| {name} | {f['anon_mib']:.1f} MiB | {f['fork_ms']:.3f} ms | {f['running_ms']:.3f} ms "
              f"| {f['child_faults']:.0f} | {f['exit_ms']:.3f} ms |")


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
