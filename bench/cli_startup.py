"""Start-up time of the fast commands against a bare interpreter.

    python bench/cli_startup.py [--rounds 30]

Runs the commands interleaved (so a burst of load on the machine hits all of
them alike) and prints the median wall time and the median CPU time (user +
system, from the kernel) of each, and each one's excess over `python -c pass`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

TPROCESS = str(Path(sys.executable).parent / "tprocess")


def measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run, output discarded."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execv(argv[0], argv)
    _, _, usage = os.wait4(pid, 0)
    return time.monotonic() - start, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    rounds = parser.parse_args().rounds
    absent = f"absent-{uuid.uuid4().hex[:8]}"
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "tprocess status --name absent": [TPROCESS, "status", "--name", absent],
        "tprocess stop --name absent": [TPROCESS, "stop", "--name", absent],
        "tprocess scale --name absent 3": [TPROCESS, "scale", "--name", absent, "3"],
        "tprocess reload --name absent": [TPROCESS, "reload", "--name", absent],
    }
    walls: dict[str, list[float]] = {label: [] for label in commands}
    cpus: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(3):  # warm the page cache
        for argv in commands.values():
            measure(argv)
    for _ in range(rounds):
        for label, argv in commands.items():
            wall, cpu = measure(argv)
            walls[label].append(wall)
            cpus[label].append(cpu)
    base_wall = statistics.median(walls["python -c pass"])
    base_cpu = statistics.median(cpus["python -c pass"])
    print(f"{'command':34} {'wall ms':>8} {'+ms':>6} {'cpu ms':>8} {'+ms':>6}"
          f"   ({rounds} runs each, medians)")
    for label in commands:
        wall, cpu = statistics.median(walls[label]), statistics.median(cpus[label])
        print(f"{label:34} {wall * 1000:8.1f} {(wall - base_wall) * 1000:6.1f} "
              f"{cpu * 1000:8.1f} {(cpu - base_cpu) * 1000:6.1f}")


if __name__ == "__main__":
    main()
