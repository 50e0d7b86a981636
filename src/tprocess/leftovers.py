"""What tasks leave behind: the master is a child subreaper, so a process a task
started is adopted by the master when its worker exits. It is asked to stop
(SIGTERM), and killed a second later if it is still there: nothing the instance
started outlives it. /proc is read off the respawn path, a moment after exits.
"""

from __future__ import annotations

import signal

from .lifecycle import describe_status, signal_child
from .logs import log
from .timers import Timer

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from .master import Master

GRACE = 1.0  # seconds a task's leftover child gets between SIGTERM and SIGKILL
SWEEP_DELAY = 0.2  # seconds after a worker's exit before looking for what it left


class Leftovers:
    def __init__(self, master: Master) -> None:
        self.m = master
        self.adopted: dict[int, bool] = {}  # pid -> SIGKILL already sent
        self.sweep_timer: Timer | None = None

    def reaped(self, pid: int, status: int) -> None:
        self.adopted.pop(pid, None)
        log.info("reaped pid %d, left behind by a task: it %s", pid, describe_status(status))

    def sweep_soon(self) -> None:
        if self.sweep_timer is None:
            self.sweep_timer = self.m.timers.call_later(SWEEP_DELAY, self._sweep_now)

    def _sweep_now(self) -> None:
        self.sweep_timer = None
        self.sweep()

    def sweep(self) -> None:
        """Ask every child that is not a worker (nor the metrics or the output process) to stop;
        kill it later."""
        m = self.m
        helpers = (m.aux.pid if m.aux is not None else 0, m.output.pid)
        fresh = [pid for pid in list_children(m.pid)
                 if pid not in m.pool.by_pid and pid not in self.adopted and pid not in helpers]
        if not fresh:
            return
        log.info("stopping %d processes left behind by tasks: %s", len(fresh), fresh)
        for pid in fresh:
            self.adopted[pid] = False
            signal_child(pid, signal.SIGTERM)
        m.timers.call_later(GRACE, self._kill, fresh)

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            if pid in self.adopted and not self.adopted[pid]:
                self.adopted[pid] = True
                signal_child(pid, signal.SIGKILL)

    def any(self) -> bool:
        return bool(self.adopted)


def list_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        import psutil

        return [p.pid for p in psutil.Process(pid).children()]
