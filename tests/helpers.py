"""Test helpers: run the real command, read the real process table, wait for events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

TPROCESS = str(Path(sys.executable).parent / "tprocess")
INSTANCE_COMMANDS = ("start", "stop", "status", "reload", "scale", "top", "logs")
T = TypeVar("T")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    uid: int
    title: str


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    rest = stat[stat.rindex(b")") + 2 :].split()
    title = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return Proc(pid, int(rest[1]), rest[0].decode(), uid, title)


def process_table() -> list[Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = read_proc(int(entry))
            if proc is not None:
                procs.append(proc)
    return procs


def instance_procs(name: str, live_only: bool = True) -> list[Proc]:
    """Processes titled as instance `name` (names are unique per test)."""
    prefix = f"{name}-"
    uid = os.getuid()
    return [
        p for p in process_table()
        if p.uid == uid and p.title.startswith(prefix) and (p.state != "Z" or not live_only)
    ]


def master_of(name: str) -> Proc | None:
    titled = [p for p in instance_procs(name) if p.title == f"{name}-master"]
    # a worker between fork and its setproctitle still carries its master's title
    masters = [p for p in titled if p.ppid not in {m.pid for m in titled}]
    assert len(masters) <= 1, masters
    return masters[0] if masters else None


def workers_of(name: str, master_pid: int) -> dict[str, Proc]:
    """Live workers under the master, by title (a child not yet retitled after fork is not one)."""
    return {
        p.title: p for p in process_table()
        if p.ppid == master_pid and p.state != "Z" and p.title.startswith(f"{name}-")
        and p.title not in (f"{name}-master", f"{name}-metrics", f"{name}-output")
    }


def pids(workers: dict[str, Proc]) -> dict[str, int]:
    """Title -> pid: what must not change when a pool is left untouched (a Proc's state may)."""
    return {title: proc.pid for title, proc in workers.items()}


def zombie_children(pid: int) -> list[Proc]:
    return [p for p in process_table() if p.ppid == pid and p.state == "Z"]


def appended_lines(path: Path) -> list[str]:
    """The whole lines of a file that workers append to; a line still being written (no
    newline yet: a reader can see part of a write that crosses a page) waits for the next
    read. [] while the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text[:text.rfind("\n") + 1].splitlines()


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll until predicate returns something truthy; fail after timeout (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def gone(pid: int) -> bool:
    proc = read_proc(pid)
    return proc is None or proc.state == "Z"


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Instance:
    """One test's instance: a unique name, a folder, and the commands to drive it."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.dir = folder
        self.log = folder / "tprocess.log"
        self.foreground: list[subprocess.Popen[str]] = []

    def write(self, filename: str, text: str) -> Path:
        path = self.dir / filename
        path.write_text(text)
        return path

    def run(self, *args: str, timeout: float = 60.0, name: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [TPROCESS, *args]
        if name and "--name" not in args and args and args[0] in INSTANCE_COMMANDS:
            argv += ["--name", self.name]
        return subprocess.run(argv, cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout, env=self._env(env))

    def start(self, *args: str, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """start -d and require success."""
        result = self.run("start", *args, "-d", "--log-file", str(self.log), timeout=timeout, env=env)
        assert result.returncode == 0, (result.stdout, result.stderr, self.read_log())
        return result

    def start_foreground(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        argv = [TPROCESS, "start", *args, "--name", self.name]
        proc = subprocess.Popen(argv, cwd=self.dir, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self._env(env))
        self.foreground.append(proc)
        return proc

    def stop(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run("stop", *args, timeout=timeout)

    def master(self) -> Proc:
        master = master_of(self.name)
        assert master is not None, f"no master for {self.name}"
        return master

    def wait_workers(self, count: int, timeout: float = 20.0) -> dict[str, Proc]:
        def full() -> dict[str, Proc] | None:
            master = master_of(self.name)
            if master is None:
                return None
            workers = workers_of(self.name, master.pid)
            return workers if len(workers) == count else None
        return wait_for(full, timeout, what=f"{count} workers of {self.name}")

    def read_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, *texts: str, timeout: float = 10.0) -> str:
        """The log once it holds every one of texts: the master's lines reach it through the
        output process, a moment after what they tell about (a replacement may already run)."""
        def holds() -> str | None:
            log = self.read_log()
            return log if all(text in log for text in texts) else None

        return wait_for(holds, timeout, what=f"{texts} in the log")

    def cleanup(self) -> None:
        """Kill, by pid, every process this test's instance left (unique title prefix)."""
        for proc in self.foreground:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        for _ in range(3):
            left = instance_procs(self.name)
            if not left:
                return
            kill_pids([p.pid for p in left])
            pids = [p.pid for p in left]
            wait_for(lambda pids=pids: all(gone(pid) for pid in pids), 10, what="leftovers to die")

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env
