"""The master's auxiliary child: a helper process that is not a worker (the metrics server).

It is forked with the master's signals blocked, like a worker, and exec'd at once
into a fresh interpreter: it inherits none of the master's memory, and the threads
it runs never meet the master's forks. The master keeps it out of the worker table
and reaps it in its one reaping place; it is restarted after a backoff (1 s,
doubling to 30 s) unless the master is stopping. At stop, once every worker is
gone, it gets SIGTERM, and SIGKILL if it is still there STOP_GRACE seconds later.
"""

from __future__ import annotations

import _signal
import os
import signal
import site
import sys
import time
from collections.abc import Sequence

from .config import Config
from .listen import parse_address, show_address
from .logs import log

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import NoReturn

RESTART_FIRST = 1.0  # seconds before the first restart
RESTART_MAX = 30.0
STABLE_RUN = 60.0  # a run at least this long resets the backoff
STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL at stop
EXIT_EXEC_FAILED = 127


class AuxProcess:
    """One auxiliary child: its command, its pid (0 when not running) and its timers."""

    def __init__(self, title: str, argv: list[str], env: dict[str, str], keep_fd: int,
                 blocked: Sequence[int]) -> None:
        self.title = title
        self.argv = argv
        self.env = env
        self.keep_fd = keep_fd  # the instance's marker: it lets discovery find the process
        self.blocked = tuple(blocked)
        self.pid = 0
        self.started_at = 0.0
        self.delay = RESTART_FIRST
        self.restart_at: float | None = None
        self.kill_at: float | None = None
        self.terminated = False

    def start(self) -> None:
        """Fork and exec; a failed fork is retried like an exit."""
        self.restart_at = None
        old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, self.blocked)
        try:
            pid = os.fork()
        except OSError as exc:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
            log.error("cannot fork %s: %s", self.title, exc.strerror)
            self._schedule_restart(time.monotonic())
            return
        if pid == 0:
            self._exec()
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        self.pid = pid
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.title, pid)

    def _exec(self) -> NoReturn:
        """In the child: drop the master's handlers, keep the marker, unblock, exec."""
        try:
            for sig in self.blocked:
                _signal.signal(sig, _signal.SIG_DFL)  # still blocked: no handler of the master runs
            signal.set_wakeup_fd(-1)  # the master's wake pipe is not ours to write
            os.set_inheritable(self.keep_fd, True)  # this process's copy only
            _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
            os.execve(self.argv[0], self.argv, self.env)
        except BaseException:  # noqa: BLE001 - never return into the master's code
            pass
        os._exit(EXIT_EXEC_FAILED)

    def reaped(self, pid: int, status: int, stopping: bool) -> bool:
        """Handle the exit if pid is this process's; False if it is not."""
        if not pid or pid != self.pid:
            return False
        from .lifecycle import describe_status  # master imports this module

        now = time.monotonic()
        uptime = now - self.started_at
        self.pid = 0
        self.kill_at = None
        if stopping:
            log.info("%s (pid %d) %s", self.title, pid, describe_status(status))
            return True
        if uptime >= STABLE_RUN:
            self.delay = RESTART_FIRST
        log.warning("%s (pid %d) %s after %.2fs; restarting it in %.0fs",
                    self.title, pid, describe_status(status), uptime, self.delay)
        self._schedule_restart(now)
        return True

    def _schedule_restart(self, now: float) -> None:
        self.restart_at = now + self.delay
        self.delay = min(self.delay * 2, RESTART_MAX)

    def next_due(self, stopping: bool) -> float | None:
        """When run_due has something to do: a restart, or a SIGKILL at stop."""
        return self.kill_at if stopping else self.restart_at

    def run_due(self, now: float, stopping: bool) -> None:
        if stopping:
            if self.kill_at is not None and self.kill_at <= now and self.pid:
                self.kill_at = None
                log.warning("killing %s (pid %d): it did not exit %.0fs after SIGTERM",
                            self.title, self.pid, STOP_GRACE)
                _signal_child(self.pid, signal.SIGKILL)
        elif self.restart_at is not None and self.restart_at <= now:
            self.start()

    def stop(self) -> bool:
        """Called at stop once the workers are gone: SIGTERM once; True while it still runs."""
        self.restart_at = None
        if not self.pid:
            return False
        if not self.terminated:
            self.terminated = True
            self.kill_at = time.monotonic() + STOP_GRACE
            _signal_child(self.pid, signal.SIGTERM)
        return True


def metrics_process(config: Config, master_pid: int, keep_fd: int,
                    blocked: Sequence[int]) -> AuxProcess | None:
    """The metrics process of this instance, or None if metrics are off."""
    if config.metrics is None:
        return None
    host, port = parse_address(config.metrics, "metrics")
    argv = [sys.executable, "-m", "tprocess.metrics", "--name", config.name,
            "--listen", show_address(host, port), "--parent", str(master_pid)]
    return AuxProcess(f"{config.name}-metrics", argv, _env_finding_this_package(), keep_fd, blocked)


def _env_finding_this_package() -> dict[str, str]:
    """The master's environment, with this package's folder on PYTHONPATH when a fresh
    interpreter would not find it (tprocess used from a source tree, not installed)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site_dirs = {os.path.abspath(d) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _signal_child(pid: int, sig: int) -> None:
    """Our own unreaped child: its pid cannot have been reused."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
