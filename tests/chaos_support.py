"""Shared pieces of the chaos, bad-input and not-ours tests.

Signals go only to processes proven to be ours: a pid is signalled through a
pidfd opened first and checked second (still a live child of the given master),
so a reused pid can never be hit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from helpers import Instance, Proc, read_proc, wait_for

# --- the process table, cheaply ------------------------------------------------------


def children_of(pid: int) -> list[Proc]:
    """Direct children of pid, zombies included (/proc/PID/task/PID/children)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            pids = [int(p) for p in fh.read().split()]
    except OSError:
        return []
    return [p for p in map(read_proc, pids) if p is not None and p.ppid == pid]


def output_process_of(name: str, master_pid: int) -> Proc | None:
    """The instance's live output process (`NAME-output`, a child of its master), if one."""
    found = [p for p in children_of(master_pid) if p.title == f"{name}-output" and p.state != "Z"]
    return found[0] if len(found) == 1 else None


def live_workers(name: str, master_pid: int) -> dict[str, Proc]:
    """Live children of the master titled as workers of instance `name`."""
    return {
        p.title: p for p in children_of(master_pid)
        if p.state != "Z" and p.title.startswith(f"{name}-")
        and p.title not in (f"{name}-master", f"{name}-output")
    }


def zombies_of(pid: int) -> set[int]:
    return {p.pid for p in children_of(pid) if p.state == "Z"}


def assert_zombies_reaped(master_pid: int, within: float = 2.0) -> int:
    """Zombies may exist for the instant between a child's death and its reaping;
    none may linger. Returns how many were seen at the sample."""
    seen = zombies_of(master_pid)
    if seen:
        wait_for(lambda: not (seen & zombies_of(master_pid)), within,
                 what=f"zombies {sorted(seen)} of {master_pid} to be reaped")
    return len(seen)


def alive(pid: int) -> bool:
    proc = read_proc(pid)
    return proc is not None and proc.state != "Z"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fds_besides_worker_pipes(pid: int) -> int:
    """The master's descriptors, less the read ends of its live workers' output pipes
    (the pipes on a child's fd 1 and 2), which come and go with the workers: whatever
    else stays open, a pipe of a dead worker included, is counted."""
    worker_pipes = set()
    for child in children_of(pid):
        for fd in (1, 2):
            try:
                worker_pipes.add(os.readlink(f"/proc/{child.pid}/fd/{fd}"))
            except OSError:
                pass
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") not in worker_pipes
        except OSError:
            pass
    return count


def status_field(pid: int, field: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads ...)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def signal_child(master_pid: int, pid: int, sig: int) -> bool:
    """Signal pid only if it is, after a pidfd is held, a live child of master_pid."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        proc = read_proc(pid)
        if proc is None or proc.ppid != master_pid or proc.state == "Z":
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def signal_master(inst: Instance, pid: int, sig: int) -> None:
    """Signal the instance's master, proven by title (unique per test) and pid."""
    fd = os.pidfd_open(pid)
    try:
        proc = read_proc(pid)
        assert proc is not None and proc.title == f"{inst.name}-master", proc
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def start(inst: Instance, *args: str, timeout: float = 60.0) -> int:
    """start -d and return the master's pid, as start printed it."""
    result = inst.start(*args, timeout=timeout)
    found = re.search(r"master pid (\d+)", result.stdout)
    assert found, result.stdout
    pid = int(found.group(1))
    proc = read_proc(pid)
    assert proc is not None and proc.title == f"{inst.name}-master", proc
    return pid


def status_json(inst: Instance) -> dict:
    result = inst.run("status", "--json", timeout=30)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def log_has_no_traceback(inst: Instance) -> None:
    text = inst.read_log()
    assert "Traceback" not in text, text[-3000:]


# --- records --------------------------------------------------------------------------


def unfinished_tasks(records: list[list[str]]) -> dict[int, list[str]]:
    """pid -> task numbers that have a start record and no end record."""
    started, ended = defaultdict(set), defaultdict(set)
    for rec in records:
        if rec[0] == "S":
            started[int(rec[1])].add(rec[2])
        elif rec[0] == "E":
            ended[int(rec[1])].add(rec[2])
    for pid, tasks in ended.items():
        assert tasks <= started[pid], f"end without start for pid {pid}: {tasks - started[pid]}"
    return {pid: sorted(tasks - ended[pid]) for pid, tasks in started.items() if tasks - ended[pid]}


# --- one clear error line ------------------------------------------------------------


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str,
                          code: int = 2) -> str:
    """A usage or input mistake: exit code, one `tprocess: error:` line, no traceback."""
    detail = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("tprocess: error: "), detail
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not named in the error\n{detail}"
    assert result.returncode == code, detail
    return lines[0]


# --- decoys ---------------------------------------------------------------------------

DECOY_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

# Run as the process's whole command line: `exec -a TITLE python3` with the
# program on stdin gives /proc/PID/cmdline == TITLE exactly, with no library,
# for any user. It records every catchable signal it receives on the fd named by $DECOY_FD.
DECOY_PROGRAM = r"""
import os, signal, time
FD = int(os.environ["DECOY_FD"])
def record(signum, frame):
    os.write(FD, ("%d %s\n" % (os.getpid(), signal.Signals(signum).name)).encode())
for sig in signal.valid_signals():
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        continue
    try:
        signal.signal(sig, record)
    except (OSError, ValueError):
        pass
os.write(FD, ("%d ready\n" % os.getpid()).encode())
while True:
    time.sleep(3600)
"""


class Decoy:
    """A process titled like an instance's, that tprocess never started."""

    def __init__(self, title: str, record: Path, uid: int | None = None) -> None:
        self.title = title
        self.record = record
        record.write_text("")
        fd = os.open(record, os.O_WRONLY | os.O_APPEND)
        extra = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
        try:
            self.proc = subprocess.Popen(
                [title], executable=DECOY_PYTHON, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(fd,),
                env={"DECOY_FD": str(fd), "PATH": "/usr/bin:/bin"}, cwd="/",
                start_new_session=True, **extra,
            )
        finally:
            os.close(fd)
        self.proc.stdin.write(DECOY_PROGRAM.encode())
        self.proc.stdin.close()
        self.pid = self.proc.pid
        wait_for(lambda: "ready" in self.record.read_text(), 10, what=f"decoy {title} to be ready")

    def signals(self) -> list[str]:
        return [line for line in self.record.read_text().splitlines() if not line.endswith(" ready")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def monotonic_ms(since: float) -> float:
    return (time.monotonic() - since) * 1000
