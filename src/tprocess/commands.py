"""The master's answers to control requests (status, stop, reload, scale) and to the
signals that mean the same (SIGHUP, SIGTTIN, SIGTTOU).

Every request is answered from the event loop without blocking it: status at once,
stop/reload/scale once they are done (the connection waits in the meantime).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from . import control
from .config import ConfigError, check_seconds
from .logs import log, recent_lines
from .pool import Phase, Worker
from .slots import BUSY, DURATION_BOUNDS, DURATION_SUM, IDLE, STATE_NAMES, TASK_START

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    import _socket
    from typing import Any

    from .master import Master

COUNT_RE = re.compile(r"([+-]?)(\d{1,7})")
RATE_WINDOW = 60.0  # seconds of throughput history kept per group
RATE_SAMPLE_EVERY = 1.0
REASONS = ("crash", "task_timeout", "setup_timeout", "max_tasks", "max_memory", "reload", "scale", "exit",
           "output")


@dataclass
class StopReport:
    """The workers a stop saw exit, and those it had to kill (the answer to `stop`)."""

    stopped: list[dict[str, Any]] = field(default_factory=list)
    killed: list[dict[str, Any]] = field(default_factory=list)

    def note_exit(self, entry: dict[str, Any]) -> None:
        """A worker exited during the stop: stopped, unless we had to kill it."""
        if not any(k["pid"] == entry["pid"] for k in self.killed):
            self.stopped.append(entry)


class Commands:
    def __init__(self, master: Master) -> None:
        self.m = master
        self.stop_waiters: list[_socket.socket] = []

    def handlers(self) -> dict[str, control.Handler]:
        return {"status": self.serve_status, "stop": self.serve_stop,
                "reload": self.serve_reload, "scale": self.serve_scale}

    def waiting_fds(self) -> list[int]:
        """Connections waiting for an answer: a new worker must not hold them open."""
        fds = [conn.fileno() for conn in self.stop_waiters]
        roll = self.m.roller.roll
        if roll is not None and roll.waiter is not None:
            fds.append(roll.waiter.fileno())
        return fds

    # --- stop ----------------------------------------------------------------------------

    def serve_stop(self, conn: _socket.socket, request: dict[str, Any]) -> None:
        """Answered in answer_stop_waiters, once every worker is gone."""
        self.stop_waiters.append(conn)
        self.m.begin_stop("stop command", _timeout_of(request))

    def answer_stop_waiters(self) -> None:
        m = self.m
        groups = {g.name: i for i, g in enumerate(m.config.groups)}
        m.stop_report.stopped.sort(key=lambda e: (groups.get(e.pop("group", ""), 0), e.pop("index", 0)))
        reply = {"master": m.pid, "stopped": m.stop_report.stopped, "killed": m.stop_report.killed}
        for conn in self.stop_waiters:
            control.reply(conn, reply)
        self.stop_waiters.clear()

    # --- reload --------------------------------------------------------------------------

    def serve_reload(self, conn: _socket.socket, request: dict[str, Any]) -> None:
        self.reload(conn, "reload command")

    def reload(self, conn: _socket.socket | None, why: str) -> None:
        """Load the config and code afresh, then roll the workers over to them."""
        m = self.m
        refusal = self._busy_refusal()
        if refusal:
            log.warning("reload (%s) refused: %s", why, refusal)
            _answer_error(conn, refusal, 1)
            return
        from .reload import load_generation

        try:
            config = load_generation(m.config, m.pool)
        except ConfigError as exc:
            log.error("reload (%s) refused, the workers go on unchanged: %s", why, exc)
            _answer_error(conn, str(exc), 2)
            return
        m.roller.begin_reload(config, conn, why)

    def _busy_refusal(self) -> str | None:
        m = self.m
        if m.stopping:
            return f"tprocess {m.config.name!r} is stopping"
        if m.starting:
            return f"tprocess {m.config.name!r} is still starting"
        busy = m.roller.busy()
        return f"{busy}; try again when it is done" if busy else None

    # --- scale ---------------------------------------------------------------------------

    def serve_scale(self, conn: _socket.socket, request: dict[str, Any]) -> None:
        refusal = self._busy_refusal()
        if refusal:
            _answer_error(conn, refusal, 1)
            return
        try:
            g, count = self._scale_target(request.get("group"), request.get("count"))
        except ConfigError as exc:
            _answer_error(conn, str(exc), 2)
            return
        self.m.roller.begin_scale(g, count, conn, "scale command")

    def _scale_target(self, group: Any, count: Any) -> tuple[Any, int]:
        m = self.m
        groups = m.pool.groups
        if group is None:
            if len(groups) != 1:
                raise ConfigError(f"name a group: {m.config.name!r} has {len(groups)} "
                                  f"({', '.join(sorted(groups))})")
            group = next(iter(groups))
        if not isinstance(group, str) or group not in groups or groups[group].removed:
            raise ConfigError(f"no group {group!r} in {m.config.name!r}; groups: "
                              + ", ".join(repr(n) for n in groups))
        g = groups[group]
        match = COUNT_RE.fullmatch(count) if isinstance(count, str) else None
        if match is None:
            raise ConfigError(f"count: expected N, +N or -N, got {count!r}")
        sign, number = match.group(1), int(match.group(2))
        new = g.target + number if sign == "+" else g.target - number if sign == "-" else number
        limit = m.config.worker_limit()
        total = sum(x.target for x in groups.values()) - g.target + new
        if new < 0:
            raise ConfigError(f"count: group {group!r} has {g.target} workers; {count} would make {new}")
        if total > limit:
            raise ConfigError(f"count: {total} workers in all would pass max_workers ({limit})")
        return g, new

    def scale_by_signal(self, delta: int) -> None:
        """SIGTTIN / SIGTTOU: one worker more or fewer in the first group."""
        m = self.m
        refusal = self._busy_refusal()
        if refusal or not m.pool.groups:
            log.warning("%s ignored: %s", "SIGTTIN" if delta > 0 else "SIGTTOU", refusal or "no group")
            return
        name = next(iter(m.pool.groups))
        try:
            g, count = self._scale_target(name, f"{delta:+d}")
        except ConfigError as exc:
            log.warning("%s ignored: %s", "SIGTTIN" if delta > 0 else "SIGTTOU", exc)
            return
        m.roller.begin_scale(g, count, None, "SIGTTIN" if delta > 0 else "SIGTTOU")

    # --- status --------------------------------------------------------------------------

    def serve_status(self, conn: _socket.socket, request: dict[str, Any]) -> None:
        control.reply(conn, self.status(request))

    def status(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        m = self.m
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        state = ("stopping" if m.stopping else "starting" if m.starting
                 else "reloading" if m.roller.roll is not None and m.roller.roll.kind == "reload"
                 else "running")
        reply: dict[str, Any] = {
            "name": m.config.name,
            "log_file": m.log_path,
            "config": m.config.path,
            "master": {"pid": m.pid, "state": state, "uptime": now - m.started_at,
                       "generation": m.generation},
            "groups": [self._group_status(g, now) for g in m.pool.groups.values()],
            "broker": m.config.broker_url() if m.config.queue_groups() else None,  # clients read depths
            "workers": [self._worker_status(w, now, now_ns) for w in m.pool.all_workers()],
        }
        lines = (request or {}).get("log_lines")
        if isinstance(lines, int) and not isinstance(lines, bool) and lines > 0:
            reply["log_tail"] = recent_lines(min(lines, 1000))
        return reply

    def _group_status(self, g: Any, now: float) -> dict[str, Any]:
        slots = self.m.slots
        workers = list(g.workers())
        tasks = g.tasks_done + sum(slots[w.slot].tasks for w in workers)
        errors = g.errors_done + sum(slots[w.slot].errors for w in workers)
        rate, window = _rate(g.rates, now, tasks)
        states: dict[str, int] = {}
        for w in workers:
            name = self._state_name(w)
            states[name] = states.get(name, 0) + 1
        return {
            "name": g.name, "workers": g.target, "generation": g.generation,
            "running": sum(1 for w in g.members.values() if w.alive and w.ready),
            "tasks": tasks, "errors": errors, "tasks_per_sec": rate, "rate_window": window,
            "restarts": {reason: g.restarts.get(reason, 0) for reason in REASONS},
            "states": states, "durations": self._durations(g, workers),
            "queue": self._queue_of(g.name),
        }

    def _queue_of(self, group: str) -> dict[str, Any] | None:
        """The group's queue by name; its depth is filled in by the client (the master never
        waits for a broker)."""
        config = self.m.config.group(group)
        queue = getattr(config, "queue", None) if config is not None else None
        return {"name": queue} if queue else None

    def _durations(self, g: Any, workers: list[Worker]) -> dict[str, Any] | None:
        if not getattr(self.m.config, "metrics", None):
            return None
        slots = self.m.slots
        counts = list(g.durations_done)
        total = g.duration_sum_done
        for w in workers:
            counts = [a + b for a, b in zip(counts, slots[w.slot].durations(), strict=True)]
            total += slots[w.slot].word(DURATION_SUM)
        return {"bounds": list(DURATION_BOUNDS), "counts": counts, "sum": total / 1e9, "count": sum(counts)}

    def _state_name(self, w: Worker) -> str:
        if w.alive:
            if w.phase is Phase.RETIRING:
                return "stopping"
            return STATE_NAMES[self.m.slots[w.slot].state]
        if w.phase is Phase.FAILED:
            return "failed"
        if w.phase is Phase.BACKOFF:
            return "backoff"
        return "stopped"

    def _worker_status(self, w: Worker, now: float, now_ns: int) -> dict[str, Any]:
        slot = self.m.slots[w.slot]
        task_time = None
        if w.alive and slot.state in (BUSY, IDLE) and slot.word(TASK_START):
            task_time = max(0.0, (now_ns - slot.word(TASK_START)) / 1e9)
        return {
            "name": w.title, "group": w.group, "index": w.index,
            "pid": w.pid or None, "state": self._state_name(w),
            "uptime": now - w.started_at if w.alive else 0.0,
            "tasks": slot.tasks, "errors": slot.errors,
            "restarts": w.restarts, "failures": w.failures,
            "task_time": task_time, "last_reason": w.last_reason, "generation": w.generation,
        }


def _rate(samples: Any, now: float, tasks: int) -> tuple[float | None, float]:
    """Tasks per second over the last minute, from samples taken when someone asked.

    The master takes no sample unless asked (an idle master never wakes), so the
    window is the time since the oldest sample of the last minute, or since the
    last sample before it if none is that recent."""
    if not samples or now - samples[-1][0] >= RATE_SAMPLE_EVERY:
        samples.append((now, tasks))
    while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
        samples.popleft()
    then, before = samples[0]
    window = now - then
    if window < 0.5:
        return None, window
    return max(0, tasks - before) / window, window


def _answer_error(conn: _socket.socket | None, message: str, code: int) -> None:
    if conn is not None:
        control.reply(conn, {"error": message, "code": code})


def _timeout_of(request: dict[str, Any]) -> float | None:
    timeout = request.get("timeout")
    try:
        return None if timeout is None else check_seconds(timeout, "timeout")
    except ConfigError:
        return None
