"""Shared memory between the master and its workers: one slot per worker.

A worker writes its own state and counters into its slot with plain stores (no
system call on the per-task path); the master reads them for `status`, to find
hung tasks, and to know which workers were busy when it had to kill them. The
memory is a memfd whose name marks every process of the instance: process
discovery looks for it in /proc/PID/fd to prove a process belongs to the instance.

The table grows by doubling: the file is extended and mapped again in the master;
workers forked earlier keep their smaller mapping, which still covers their slot.
"""

from __future__ import annotations

import mmap
import os

from .discovery import marker_name

STARTING, IDLE, BUSY, STOPPING = 0, 1, 2, 3
STATE_NAMES = {STARTING: "starting", IDLE: "idle", BUSY: "busy", STOPPING: "stopping"}

# the 64-bit words of a slot
STATE, TASKS, ERRORS = 0, 1, 2
TASK_START = 3  # CLOCK_MONOTONIC ns when the current task began
WOKE_AT = 4  # CLOCK_MONOTONIC ns when ctx.sleep last returned (busy again)
EXIT_REASON = 5  # why the worker ended itself: one of the RECYCLE_* codes
DURATION_SUM = 6  # ns spent in tasks (only counted when metrics are on)
BUCKETS = 7  # task-duration histogram: one word per bound, then +Inf
DURATION_BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)  # seconds
BUCKET_COUNT = len(DURATION_BOUNDS) + 1
WORDS_PER_SLOT = BUCKETS + BUCKET_COUNT

RECYCLE_NONE, RECYCLE_MAX_TASKS, RECYCLE_MAX_MEMORY = 0, 1, 2
RECYCLE_REASONS = {RECYCLE_MAX_TASKS: "max_tasks", RECYCLE_MAX_MEMORY: "max_memory"}


class Slot:
    """One worker's words. The worker's task loop indexes `words` directly: a
    memoryview store costs about a third less than a ctypes field's."""

    __slots__ = ("words", "base")

    def __init__(self, words: memoryview, base: int) -> None:
        self.words = words
        self.base = base

    @property
    def state(self) -> int:
        return self.words[self.base + STATE]

    @state.setter
    def state(self, value: int) -> None:
        self.words[self.base + STATE] = value

    @property
    def tasks(self) -> int:
        return self.words[self.base + TASKS]

    @property
    def errors(self) -> int:
        return self.words[self.base + ERRORS]

    def word(self, index: int) -> int:
        return self.words[self.base + index]

    def busy_since(self) -> int:
        """When the worker last started working (a task began or ctx.sleep returned), in ns; 0 if unknown."""
        started = self.words[self.base + TASK_START]
        return max(started, self.words[self.base + WOKE_AT]) if started else 0

    def durations(self) -> list[int]:
        return list(self.words[self.base + BUCKETS: self.base + WORDS_PER_SLOT])

    def clear(self) -> None:
        """Every word to zero, for a new worker position."""
        for i in range(self.base, self.base + WORDS_PER_SLOT):
            self.words[i] = 0

    def prepare_spawn(self) -> None:
        """What a predecessor left that must not be read as the new process's."""
        words, base = self.words, self.base
        words[base + STATE] = STARTING
        words[base + TASK_START] = 0
        words[base + WOKE_AT] = 0
        words[base + EXIT_REASON] = RECYCLE_NONE


class SlotTable:
    """The mapped array of slots, created by the master before it forks."""

    def __init__(self, name: str, count: int) -> None:
        self.fd = os.memfd_create(marker_name(os.getuid(), name), os.MFD_CLOEXEC)
        self._maps: list[mmap.mmap] = []  # older maps stay: views of them may still be exported
        self._slots: list[Slot] = []
        self._free: list[int] = []
        self._map_for(max(count, 8))

    def _map_for(self, count: int) -> None:
        size = -(-8 * WORDS_PER_SLOT * count // mmap.PAGESIZE) * mmap.PAGESIZE
        os.ftruncate(self.fd, size)
        self._maps.append(mmap.mmap(self.fd, size))
        words = memoryview(self._maps[-1]).cast("Q")
        old = len(self._slots)
        capacity = size // (8 * WORDS_PER_SLOT)
        self._slots = [Slot(words, i * WORDS_PER_SLOT) for i in range(capacity)]
        self._free.extend(range(capacity - 1, old - 1, -1))  # lowest numbers handed out first

    def allocate(self) -> int:
        """A free slot, zeroed; the table grows when none is left."""
        if not self._free:
            self._map_for(2 * len(self._slots))
        number = self._free.pop()
        self._slots[number].clear()
        return number

    def release(self, number: int) -> None:
        self._free.append(number)

    def __getitem__(self, index: int) -> Slot:
        return self._slots[index]
