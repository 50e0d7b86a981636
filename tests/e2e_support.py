"""Shared pieces of the end-to-end tests: task files that leave records, and readers.

A record task appends one line per event to a records file ("start PID N",
"end PID N", ...), with O_APPEND writes small enough to be atomic, so several
workers can share one file and a test can prove that no task was cut in half.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import Instance, appended_lines

# three workers of jobs.py:work; min_uptime = 0: a kill -9 from outside is not an early
# death, so no backoff slows a test that kills many
FAST_RESPAWN = '''
name = "{name}"
min_uptime = 0

[groups.k]
task = "jobs.py:work"
workers = 3
'''


RECORD_LIB = '''
import os
import time

RECORDS = {records!r}
_count = 0


def record(kind, *extra):
    line = " ".join([kind, str(os.getpid()), str(_count), *map(str, extra)]) + "\\n"
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def busy(ctx):
    """A task of {seconds} s of work that no stop request can interrupt."""
    global _count
    _count += 1
    record("start")
    time.sleep({seconds})
    record("end")
'''


# A task file's preamble: record(*words) appends one line to records.txt beside the file.
WORD_RECORDS = '''
import os
import time

RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records.txt")


def record(*words):
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(map(str, words)) + "\\n").encode())
    finally:
        os.close(fd)
'''


def word_records(inst: Instance) -> list[list[str]]:
    """The lines of records.txt (see WORD_RECORDS), split into words."""
    return [line.split() for line in appended_lines(inst.dir / "records.txt")]


def record_task(inst: Instance, seconds: float, filename: str = "jobs.py",
                extra: str = "") -> Path:
    """Write FILE.py with busy(ctx) (start record, time.sleep, end record) + extra code."""
    records = inst.dir / "records.txt"
    inst.write(filename, RECORD_LIB.format(records=str(records), seconds=seconds) + extra)
    return records


def read_records(path: Path) -> list[list[str]]:
    return [line.split() for line in appended_lines(path) if line.strip()]


def records_of(path: Path, kind: str) -> list[tuple[int, int]]:
    """(pid, count) of every record of one kind."""
    return [(int(r[1]), int(r[2])) for r in read_records(path) if r[0] == kind]


def open_tasks(path: Path) -> list[tuple[int, int]]:
    """Tasks with a start record and no end record."""
    ends = Counter(records_of(path, "end"))
    return [s for s in records_of(path, "start") if not ends[s]]


def started_pids(path: Path) -> set[int]:
    return {pid for pid, _ in records_of(path, "start")}


def wait_started(path: Path, pids: set[int] | int, timeout: float = 15.0) -> set[int]:
    """Wait until the given pids (or this many distinct pids) are in a task."""
    from helpers import wait_for

    def ready() -> set[int] | None:
        open_pids = {pid for pid, _ in open_tasks(path)}
        if isinstance(pids, int):
            return open_pids if len(open_pids) >= pids else None
        return open_pids if pids <= open_pids else None

    return wait_for(ready, timeout, what=f"tasks started by {pids}")


def status_json(inst: Instance, *args: str) -> dict[str, Any]:
    result = inst.run("status", "--json", *args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<title>\S+)\[(?P<pid>\d+)\] "
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<message>.*)$"
)


def log_records(text: str) -> list[re.Match[str]]:
    return [m for m in map(LOG_LINE.match, text.splitlines()) if m]


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()[0].decode()


def signal_if_alive(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
