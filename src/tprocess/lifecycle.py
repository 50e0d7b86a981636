"""What happens to a worker position when its process ends, and how a process is ended.

The master's one reaping place hands every worker exit here: the reason is worked
out (a crash, a planned exit, a recycle, a kill of ours), counted, and the position
is restarted at once, restarted after a backoff, marked failed, or given up for
good. Retiring (a stop, a scale-down, a reload's replacement) and killing are here
too, so that every transition of a position goes through one place.
"""

from __future__ import annotations

import os
import signal
import time

from . import worker
from .logs import log
from .pool import LIVE, Phase, Worker
from .slots import BUSY, EXIT_REASON, RECYCLE_REASONS, STATE_NAMES

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from .master import Master

BACKOFF_BASE = 0.1
PLANNED = ("exit", "max_tasks", "max_memory", "output")  # reasons that are no failure


class Lifecycle:
    def __init__(self, master: Master) -> None:
        self.m = master

    # --- a process ended -----------------------------------------------------------------

    def on_exit(self, w: Worker, status: int) -> None:
        m = self.m
        m.output.worker_exited(w.pid)  # its last lines go before its exit in the log
        uptime = time.monotonic() - w.started_at
        reason = self.exit_reason(w, status)
        entry = {"name": w.title, "pid": w.pid, "exit": os.waitstatus_to_exitcode(status),
                 "group": w.group, "index": w.index}
        w.pid = 0
        w.cancel_timer()
        log.info("worker %s (pid %d) %s after %.2fs (%s)", w.title, entry["pid"],
                 describe_status(status), uptime, reason)
        if m.stopping:
            m.stop_report.note_exit(entry)
            self.end_position(w)
            return
        if w.phase is Phase.RETIRING:
            m.roller.on_retired(w, entry)
            return
        died_in_setup = not w.ready
        w.last_reason = reason
        if m.roller.on_worker_died(w, died_in_setup, m.startup.setup_errors.get(w.group)):
            return
        m.pool.group_of(w).restarts[reason] += 1
        if m.starting and died_in_setup and m.startup.died_in_setup(w):
            return
        self._restart_or_give_up(w, reason, uptime)

    def exit_reason(self, w: Worker, status: int) -> str:
        if w.ending:
            return w.ending
        if os.waitstatus_to_exitcode(status) == worker.EXIT_OK:
            return RECYCLE_REASONS.get(self.m.slots[w.slot].word(EXIT_REASON), "exit")
        return "crash"

    def _restart_or_give_up(self, w: Worker, reason: str, uptime: float) -> None:
        m = self.m
        group = m.group_config(w)
        min_uptime = m.config.group_min_uptime(group)
        w.failures = _failures_after(w.failures, reason, uptime < min_uptime)
        w.restarts += 1
        if w.failures >= m.config.group_max_failures(group):
            w.move(Phase.FAILED)
            log.error("%s failed %d times in a row within %.1fs of starting; not restarting it",
                      w.title, w.failures, min_uptime)
            m.notifier.status(m.pool.summary())
            m.startup.gave_up(w)
            m.roller.check_done()
            return
        w.move(Phase.BACKOFF)
        delay = backoff_delay(w.failures, m.config.group_backoff_max(group))
        if delay > 0:
            log.warning("restarting %s in %.1fs (failure %d in a row)", w.title, delay, w.failures)
            w.timer = m.timers.call_later(delay, self.restart, w)
        else:
            m.spawn(w)

    def restart(self, w: Worker) -> None:
        w.timer = None
        if not self.m.stopping and w.phase in (Phase.BACKOFF, Phase.FAILED):
            self.m.spawn(w)

    def end_position(self, w: Worker) -> None:
        """The position is given up for good: out of its group, its slot freed."""
        if w.phase in LIVE and w.phase is not Phase.RETIRING:
            w.move(Phase.RETIRING)
        pool = self.m.pool
        g = pool.group_of(w)
        for table in (g.members, g.candidates):
            if table.get(w.index) is w:
                del table[w.index]
        if w in g.retiring:
            g.retiring.remove(w)
        pool.forget(w)

    # --- ending a process ----------------------------------------------------------------

    def retire(self, w: Worker, reason: str, timeout: float | None = None, send: bool = True) -> None:
        """Ask a worker to finish its task and exit for good; kill it past its graceful timeout.
        send=False: the caller sends the SIGTERM itself (a stop signals every worker in one batch)."""
        m = self.m
        w.cancel_timer()
        if not w.alive:
            self.end_position(w)
            return
        w.move(Phase.RETIRING)
        w.ending = reason
        grace = m.config.group_timeout(m.group_config(w)) if timeout is None else timeout
        self.kill_later(w, grace)
        if send:
            signal_child(w.pid, signal.SIGTERM)

    def kill_later(self, w: Worker, delay: float) -> None:
        w.cancel_timer()
        w.timer = self.m.timers.call_later(delay, self._kill_retiring, w, w.pid)

    def _kill_retiring(self, w: Worker, pid: int) -> None:
        w.timer = None
        if w.pid == pid:
            self.kill(w, "its graceful timeout passed")

    def kill(self, w: Worker, why: str, reason: str | None = None) -> None:
        """SIGKILL a worker now, saying whether a task is cut."""
        m = self.m
        busy = m.slots[w.slot].state == BUSY
        state = STATE_NAMES[m.slots[w.slot].state]
        if busy:
            log.error("killing %s (pid %d) in the middle of a task: %s", w.title, w.pid, why)
        else:
            log.warning("killing %s (pid %d, %s): %s", w.title, w.pid, state, why)
        if reason:
            w.ending = reason
        if w.phase is Phase.RETIRING:
            m.roller.on_killed(w, state)
        if m.stopping:
            m.stop_report.killed.append({"name": w.title, "pid": w.pid, "state": state})
        signal_child(w.pid, signal.SIGKILL)


def _failures_after(failures: int, reason: str, early: bool) -> int:
    """Early deaths in a row, after one more death for this reason."""
    if reason in PLANNED:
        return 0
    if reason == "task_timeout":  # a hung task is not an early death unless it keeps coming early
        return failures + 1 if early else 0
    if reason == "setup_timeout" or early:
        return failures + 1
    return 1


def backoff_delay(failures: int, cap: float) -> float:
    """No delay for a first failure, then 0.1s, 0.2s, 0.4s ... up to cap."""
    if failures <= 1:
        return 0.0
    return min(cap, BACKOFF_BASE * 2 ** (failures - 2))


_SIGNAL_NAMES = {sig.value: sig.name for sig in signal.Signals}  # no enum lookup at each exit


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = _SIGNAL_NAMES.get(sig)
        return f"was killed by {name}" if name else f"was killed by signal {sig}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def signal_child(pid: int, sig: int) -> None:
    """Signal our own child: safe by pid, since it cannot be reused before we reap it."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
