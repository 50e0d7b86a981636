"""Protection from hung workers: `setup_timeout` and `task_timeout`.

Both are off by default and cost nothing then. A worker stamps the start of each
task (and each return from ctx.sleep) in its slot; the master checks those stamps
only when a deadline can have passed: at the earliest end of a busy worker's
allowance, and at the latest one `task_timeout` after the last check (a sleeping
worker may start working at any moment). Recycling (`max_tasks`, `max_memory`) is
done by the workers themselves at task boundaries (worker.py).
"""

from __future__ import annotations

import time

from .config import GroupConfig
from .logs import log
from .pool import Worker
from .slots import BUSY, STARTING
from .timers import Timer

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from .master import Master

MIN_CHECK_INTERVAL = 0.01


class Guards:
    def __init__(self, master: Master) -> None:
        self.m = master
        self.hang_check: Timer | None = None

    def on_spawn(self, w: Worker, group: GroupConfig) -> None:
        if group.setup_timeout:
            self.m.timers.call_later(group.setup_timeout, self._check_setup, w, w.pid, group.setup_timeout)
        if group.task_timeout:
            self._arm(time.monotonic() + group.task_timeout)

    def _check_setup(self, w: Worker, pid: int, limit: float) -> None:
        m = self.m
        if w.pid != pid or w.ready or m.stopping or m.slots[w.slot].state != STARTING:
            return
        m.life.kill(w, f"still in setup after {limit:g}s (setup_timeout)", reason="setup_timeout")

    def _arm(self, when: float) -> None:
        when = max(when, time.monotonic() + MIN_CHECK_INTERVAL)
        if self.hang_check is not None:
            if not self.hang_check.cancelled and self.hang_check.when <= when:
                return
            self.hang_check.cancel()
        self.hang_check = self.m.timers.call_at(when, self._check_hung)

    def _check_hung(self) -> None:
        """Kill the workers whose task has run past task_timeout; come back when the next may."""
        self.hang_check = None
        m = self.m
        if m.stopping:
            return
        now_ns = time.monotonic_ns()
        now = now_ns / 1e9
        next_due: float | None = None
        for w in m.pool.live():
            limit = m.group_config(w).task_timeout
            if not limit:
                continue
            slot = m.slots[w.slot]
            since = slot.busy_since()
            due = now + limit  # idle or in setup: it may begin a task at any moment
            if slot.state == BUSY and since:
                ran = (now_ns - since) / 1e9
                if ran >= limit:
                    log.error("task of %s (pid %d) has run %.1fs, past task_timeout %gs: it is hung",
                              w.title, w.pid, ran, limit)
                    m.life.kill(w, "task_timeout", reason="task_timeout")
                    continue
                due = since / 1e9 + limit
            next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._arm(next_due)
