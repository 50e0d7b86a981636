"""Rolling reloads and scaling: moving groups to a new generation or size, a few at a time.

Each group has a desired state (its generation and its target size, in pool.Group).
A `Roll` (one reload or one scale, never two at once) changes those and then
*converges*: after every event (a worker ready, a worker gone) each group takes
the next step towards its desired state:

1. shrink: positions past the target retire (they finish their task and exit);
2. grow: missing positions below the target are started;
3. replace (reload only): a live worker of an older generation gets a *candidate*
   of the new one under the same title; once the candidate is through `setup`, the
   old worker retires. At most `reload_batch` candidates and retiring workers per
   group at a time, so a group never has fewer than N ready workers nor more than
   N + reload_batch processes.

A reload whose new workers fail in `setup` is rolled back: the groups' desired
state goes back to the old generation and the same steps bring the old code back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import control
from .config import Config
from .logs import log
from .pool import Group, Phase, Worker

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    import _socket
    from typing import Any

    from .master import Master


@dataclass(eq=False)
class Roll:
    """One reload or one scale in progress, and what it did so far (for its answer)."""

    kind: str  # "reload" or "scale"
    why: str
    waiter: _socket.socket | None
    groups: list[str]
    old_generation: int
    # group -> (generation, target, removed) before the reload, for a rollback
    previous: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    replaced: list[dict[str, Any]] = field(default_factory=list)
    started: list[dict[str, Any]] = field(default_factory=list)
    stopped: list[dict[str, Any]] = field(default_factory=list)
    killed: list[dict[str, Any]] = field(default_factory=list)
    fresh: set[Worker] = field(default_factory=set)  # started by this roll: must get through setup
    failed: set[Worker] = field(default_factory=set)  # fresh workers that died in setup (scale)
    skip: set[tuple[str, int]] = field(default_factory=set)  # positions a rollback could not bring back
    removed: set[Worker] = field(default_factory=set)  # retired without a replacement
    removals: list[str] = field(default_factory=list)  # groups to stop once the others have rolled
    error: str | None = None
    before: int = 0  # a scale's group size before it
    rolling_back: bool = False
    began: float = field(default_factory=time.monotonic)


class Roller:
    def __init__(self, master: Master) -> None:
        self.m = master
        self.roll: Roll | None = None

    # --- beginning -----------------------------------------------------------------------

    def begin_reload(self, config: Config, waiter: _socket.socket | None, why: str) -> None:
        m = self.m
        old = m.generation
        m.generation = m.newest_generation = m.newest_generation + 1  # never reused, even after a rollback
        m.generations[m.generation] = config
        m.config = config
        roll = Roll("reload", why, waiter, [], old)
        for name, g in m.pool.groups.items():
            roll.previous[name] = (g.generation, g.target, g.removed)
        for group in config.groups:
            g = m.pool.groups.get(group.name) or m.pool.add_group(group, m.generation)
            g.generation, g.target, g.removed = m.generation, group.workers, False
        # groups gone from the file stop last: a roll that fails and goes back keeps them running
        roll.removals = [name for name in m.pool.groups if config.group(name) is None]
        roll.groups = [name for name in m.pool.groups if name not in roll.removals]
        log.info("reload (%s): rolling %d groups to generation %d, %d at a time",
                 why, len(roll.groups), m.generation, config.reload_batch)
        m.notifier.reloading(f"reloading: rolling to generation {m.generation}")
        self._begin(roll)

    def begin_scale(self, g: Group, count: int, waiter: _socket.socket | None, why: str) -> None:
        log.info("scale (%s): group %r from %d to %d workers", why, g.name, g.target, count)
        roll = Roll("scale", why, waiter, [g.name], self.m.generation, before=g.target)
        g.target = count
        self._begin(roll)

    def _begin(self, roll: Roll) -> None:
        self.roll = roll
        for name in roll.groups:
            self.converge(name)
        self.check_done()

    # --- converging -------------------------------------------------------------------------

    def converge(self, name: str) -> None:
        """One step of a group towards its desired generation and size."""
        g = self.m.pool.groups.get(name)
        roll = self.roll
        if g is None or roll is None:
            return
        for index, c in list(g.candidates.items()):  # a rollback, or a shrink, leaves them without a place
            if c.generation != g.generation or index >= g.target:
                del g.candidates[index]
                self._retire(g, c, "reload")
        for index in sorted(g.members, reverse=True):
            if index >= g.target:
                w = g.members.pop(index)
                roll.removed.add(w)
                g.restarts[roll.kind] += 1
                self._retire(g, w, roll.kind)
        grown = [self._grow(g, index, roll) for index in range(g.target) if index not in g.members]
        if grown:
            self.m.spawn_many(grown)  # forked back to back, like at start-up
            roll.started += [{"name": w.title, "pid": w.pid} for w in grown]
        if roll.kind == "reload":
            self._replace_some(g, roll)

    def _grow(self, g: Group, index: int, roll: Roll) -> Worker:
        """A new position below the target (forked by the caller)."""
        w = self.m.pool.new_worker(g, index, self.m.title(g.name, index))
        g.members[index] = w
        roll.fresh.add(w)
        g.restarts[roll.kind] += 1
        return w

    def _replace_some(self, g: Group, roll: Roll) -> None:
        m = self.m
        batch = m.config.group_reload_batch(m.group_config(g))
        in_flight = len(g.candidates) + sum(1 for r in g.retiring if r.ending == "reload")
        to_fork = []
        for index, w in sorted(g.members.items()):
            if w.generation == g.generation or index in g.candidates or (g.name, index) in roll.skip:
                continue
            if not w.alive:  # backing off or failed: nothing to keep running, restart it as new
                self._renew(g, w, roll)
                to_fork.append(w)
                continue
            if in_flight >= batch:
                break
            c = m.pool.new_worker(g, index, w.title)
            c.restarts = w.restarts
            g.candidates[index] = c
            roll.fresh.add(c)
            to_fork.append(c)
            in_flight += 1
        if to_fork:
            m.spawn_many(to_fork)

    def _renew(self, g: Group, w: Worker, roll: Roll) -> None:
        w.cancel_timer()
        w.generation = g.generation
        w.failures = 0
        w.ever_ready = False
        roll.fresh.add(w)

    def _retire(self, g: Group, w: Worker, reason: str) -> None:
        if w.alive:
            g.retiring.append(w)
        self.m.life.retire(w, reason)

    # --- events ------------------------------------------------------------------------------

    def on_ready(self, w: Worker) -> None:
        g = self.m.pool.groups.get(w.group)
        if g is None or self.roll is None:
            return
        if g.candidates.get(w.index) is w:
            del g.candidates[w.index]
            old = g.members.get(w.index)
            g.members[w.index] = w
            w.last_reason = "reload"
            g.restarts["reload"] += 1
            if old is not None:
                self.roll.replaced.append({"name": w.title, "old_pid": old.pid or None, "new_pid": w.pid})
                self._retire(g, old, "reload")
            self.converge(g.name)
        self.check_done()

    def on_retired(self, w: Worker, entry: dict[str, Any]) -> None:
        """A retiring worker exited (not during a stop)."""
        roll = self.roll
        if roll is not None and w in roll.removed:
            roll.stopped.append(entry)
        self.m.life.end_position(w)
        if roll is not None:
            self.converge(w.group)
            self.check_done()

    def on_killed(self, w: Worker, state: str) -> None:
        if self.roll is not None:
            self.roll.killed.append({"name": w.title, "pid": w.pid, "state": state})

    def on_worker_died(self, w: Worker, died_in_setup: bool, error: str | None) -> bool:
        """A worker died unasked. True if the roll took care of it (no ordinary restart)."""
        roll = self.roll
        g = self.m.pool.groups.get(w.group)
        if roll is None or g is None:
            return False
        if g.candidates.get(w.index) is w:
            del g.candidates[w.index]
            self.m.life.end_position(w)
            self._new_worker_failed(g, w, roll, error)
            return True
        if w.index in g.candidates and g.members.get(w.index) is w:  # its replacement is on the way
            c = g.candidates.pop(w.index)
            g.members[w.index] = c
            roll.replaced.append({"name": w.title, "old_pid": None, "new_pid": c.pid})
            self.m.life.end_position(w)
            self.check_done()
            return True
        if w in roll.fresh and died_in_setup:
            if roll.kind == "reload" and not roll.rolling_back:
                w.move(Phase.BACKOFF)
                self.abort(self._setup_error(g, error))
                return True
            roll.failed.add(w)
            if roll.error is None:
                roll.error = self._setup_error(g, error)
            self.check_done()
            return False
        if roll.kind == "reload" and w.generation != g.generation:
            self._renew(g, w, roll)  # it was to be replaced anyway: come back as new
        return False

    def _new_worker_failed(self, g: Group, w: Worker, roll: Roll, error: str | None) -> None:
        if roll.kind == "reload" and not roll.rolling_back:
            self.abort(self._setup_error(g, error))
            return
        roll.skip.add((g.name, w.index))  # the old worker stays at this position
        self.converge(g.name)
        self.check_done()

    def _setup_error(self, g: Group, error: str | None) -> str:
        what = f"group {g.name!r}" if g.name else "the workers"
        detail = f"a new worker of {what} failed during start-up"
        return f"{detail}:\n{error}" if error else f"{detail} (see the log)"

    # --- ending --------------------------------------------------------------------------------

    def abort(self, error: str) -> None:
        """The new generation does not start: bring every group back to where it was."""
        roll = self.roll
        assert roll is not None
        m = self.m
        roll.error, roll.rolling_back = error, True
        log.error("reload failed, going back to generation %d: %s", roll.old_generation, error)
        m.generation = roll.old_generation
        m.config = m.generations[roll.old_generation]
        for name in list(m.pool.groups):
            if name not in roll.previous:
                g = m.pool.groups[name]
                g.target, g.removed = 0, True
        for name, (generation, target, removed) in roll.previous.items():
            g = m.pool.groups.get(name)
            if g is None:
                g = m.pool.add_group(m.generations[generation].group(name), generation)  # type: ignore[arg-type]
            g.generation, g.target, g.removed = generation, target, removed
            if name not in roll.groups:
                roll.groups.append(name)
        for name in list(roll.groups):
            self.converge(name)
        self.check_done()

    def abort_for_stop(self) -> None:
        if self.roll is not None:
            roll, self.roll = self.roll, None
            roll.error = roll.error or f"the instance is stopping; the {roll.kind} did not finish"
            self._answer(roll)

    def check_done(self) -> None:
        roll = self.roll
        if roll is None or not all(self._group_done(name, roll) for name in roll.groups):
            return
        if roll.removals and not roll.rolling_back:
            self._remove_groups(roll)
            return
        self.roll = None
        self._forget_old_generations()
        took = time.monotonic() - roll.began
        if roll.error:
            log.error("%s ended after %.2fs: %s", roll.kind, took, roll.error.splitlines()[0])
        else:
            log.info("%s done in %.2fs: %d replaced, %d started, %d stopped", roll.kind, took,
                     len(roll.replaced), len(roll.started), len(roll.stopped))
        if roll.kind == "reload":
            self.m.notifier.ready(self.m.pool.summary() + f", generation {self.m.generation}")
        self._answer(roll)

    def _remove_groups(self, roll: Roll) -> None:
        """The rest has rolled: now the groups dropped from the file stop."""
        names, roll.removals = roll.removals, []
        for name in names:
            g = self.m.pool.groups[name]
            g.target, g.removed = 0, True
            roll.groups.append(name)
            self.converge(name)
        self.check_done()

    def _group_done(self, name: str, roll: Roll) -> bool:
        g = self.m.pool.groups.get(name)
        if g is None:
            return True
        if g.candidates or any(r.ending in ("reload", "scale") for r in g.retiring):
            return False
        if len(g.members) != g.target:
            return False
        for index, w in g.members.items():
            if (name, index) in roll.skip or w in roll.failed or w.phase is Phase.FAILED:
                continue
            if w.generation != g.generation or (w in roll.fresh and not w.ever_ready):
                return False
        return True

    def _forget_old_generations(self) -> None:
        m = self.m
        used = {w.generation for w in m.pool.all_workers()} | {m.generation}
        for generation in list(m.generations):
            if generation not in used:
                del m.generations[generation]

    def _answer(self, roll: Roll) -> None:
        if roll.waiter is None:
            return
        reply: dict[str, Any] = {
            "generation": self.m.generation, "replaced": roll.replaced, "started": roll.started,
            "stopped": roll.stopped, "killed": roll.killed,
        }
        if roll.kind == "scale" and roll.groups:
            g = self.m.pool.groups.get(roll.groups[0])
            reply["group"] = roll.groups[0]
            reply["before"] = roll.before
            reply["workers"] = g.target if g else 0
        if roll.error:
            reply.update(error=roll.error, code=1)
        else:
            reply["ok"] = True
        control.reply(roll.waiter, reply)

    def busy(self) -> str | None:
        """What is in progress, for refusing a second reload or scale."""
        roll = self.roll
        if roll is None:
            return None
        return f"a {roll.kind} is in progress ({roll.why}, {time.monotonic() - roll.began:.1f}s so far)"
