"""The worker table: every worker position of every group, and its life cycle.

A `Worker` is a named position (`NAME-GROUP-I`) that one process after another
fills. Its phase changes only through the transitions listed in TRANSITIONS, so
the master's decisions (respawn, back off, give up, retire) read as a state machine:

    NEW ──spawned──> STARTING ──ready──> RUNNING
     ^                  │  │                │  │
     │     died (crash) │  └──── retire ────┼──┴──> RETIRING ──died──> GONE
     └─ BACKOFF <───────┴───────────────────┘
          │ too many early deaths in a row
          └──> FAILED                  (BACKOFF and FAILED retire straight to GONE)

During a rolling reload a position may have a *candidate*: a new worker of the
new generation, under the same title, that takes the position once it is ready.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .config import GroupConfig
from .slots import BUCKET_COUNT, DURATION_SUM, SlotTable
from .timers import Timer


class Phase(enum.Enum):
    NEW = "new"  # not forked yet
    STARTING = "starting"  # forked, in setup
    RUNNING = "running"  # past setup: idle or busy, as its slot says
    RETIRING = "retiring"  # asked to stop for good (stop, scale down, replaced by a reload)
    BACKOFF = "backoff"  # died; a restart is scheduled
    FAILED = "failed"  # died early too often in a row: not restarted
    GONE = "gone"  # ended for good


TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.NEW: {Phase.STARTING, Phase.BACKOFF, Phase.GONE},
    Phase.STARTING: {Phase.RUNNING, Phase.RETIRING, Phase.BACKOFF, Phase.FAILED},
    Phase.RUNNING: {Phase.RETIRING, Phase.BACKOFF, Phase.FAILED},
    Phase.RETIRING: {Phase.GONE},
    Phase.BACKOFF: {Phase.STARTING, Phase.BACKOFF, Phase.FAILED, Phase.GONE},
    Phase.FAILED: {Phase.STARTING, Phase.GONE},
    Phase.GONE: set(),
}
LIVE = (Phase.STARTING, Phase.RUNNING, Phase.RETIRING)


class TransitionError(RuntimeError):
    pass


@dataclass(eq=False, slots=True)  # slots: 2,000 of them live in the master (issue 8)
class Worker:
    """One position of the table and the process that fills it now (pid 0: none)."""

    group: str
    index: int
    title: str
    generation: int
    slot: int
    phase: Phase = Phase.NEW
    pid: int = 0
    started_at: float = 0.0  # monotonic
    restarts: int = 0
    failures: int = 0  # early deaths in a row
    ready: bool = False  # this process got through setup
    ever_ready: bool = False  # some process of this generation got through setup here
    last_reason: str | None = None  # why the previous process of this position ended
    ending: str | None = None  # why we are ending the current process (task_timeout, reload...)
    timer: Timer | None = None  # a pending restart or kill

    def move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise TransitionError(f"{self.title}: {self.phase.value} -> {phase.value}")
        self.phase = phase

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def alive(self) -> bool:
        return self.pid != 0


@dataclass(eq=False)
class Group:
    """A group's desired state (generation and size) and its workers."""

    name: str
    generation: int  # what new workers of this group run
    target: int  # how many workers it should have
    members: dict[int, Worker] = field(default_factory=dict)  # index -> the position's worker
    candidates: dict[int, Worker] = field(default_factory=dict)  # index -> its replacement, starting
    retiring: list[Worker] = field(default_factory=list)  # asked to stop for good, not exited yet
    tasks_done: int = 0  # tasks of positions that no longer exist
    errors_done: int = 0
    durations_done: list[int] = field(default_factory=lambda: [0] * BUCKET_COUNT)
    duration_sum_done: int = 0
    restarts: Counter[str] = field(default_factory=Counter)  # replacements by reason
    rates: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tasks) samples
    removed: bool = False  # dropped from the config by a reload: deleted once empty

    def workers(self) -> Iterator[Worker]:
        yield from self.members.values()
        yield from self.candidates.values()
        yield from self.retiring


class Pool:
    """The one worker table: groups, their workers, who is which pid, and the slots."""

    def __init__(self, slots: SlotTable) -> None:
        self.slots = slots
        self.groups: dict[str, Group] = {}
        self.by_pid: dict[int, Worker] = {}

    def add_group(self, group: GroupConfig, generation: int) -> Group:
        g = Group(group.name, generation, group.workers)
        g.rates.append((time.monotonic(), 0))  # the first rate asked for is the average since now
        self.groups[group.name] = g
        return g

    def new_worker(self, g: Group, index: int, title: str) -> Worker:
        return Worker(g.name, index, title, g.generation, self.slots.allocate())

    def all_workers(self) -> Iterator[Worker]:
        for g in self.groups.values():
            yield from g.workers()

    def live(self) -> list[Worker]:
        return list(self.by_pid.values())

    def summary(self) -> str:
        """One line for `systemctl status`: how many workers run, how many failed."""
        members = [w for g in self.groups.values() for w in g.members.values()]
        running = sum(1 for w in members if w.alive)
        failed = sum(1 for w in members if w.phase is Phase.FAILED)
        text = f"{running} workers running" if running == len(members) else \
            f"{running} of {len(members)} workers running"
        return f"{text}, {failed} failed" if failed else text

    def group_of(self, w: Worker) -> Group:
        return self.groups[w.group]

    def forget(self, w: Worker) -> None:
        """A position ends for good: keep its counts in the group's totals, free its slot."""
        g = self.groups[w.group]
        slot = self.slots[w.slot]
        g.tasks_done += slot.tasks
        g.errors_done += slot.errors
        g.durations_done = [a + b for a, b in zip(g.durations_done, slot.durations(), strict=True)]
        g.duration_sum_done += slot.word(DURATION_SUM)
        w.cancel_timer()
        w.move(Phase.GONE)
        self.slots.release(w.slot)
        if g.removed and not any(True for _ in g.workers()):
            del self.groups[g.name]  # a group removed by a reload, now empty
