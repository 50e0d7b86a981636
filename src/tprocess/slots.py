"""Shared memory between the master and its workers: one slot per worker index.

A worker writes its own state and counters into its slot with plain stores (no
system call on the per-task path); the master reads them for `status` and to know
which workers were busy when it had to kill them. The memory is a memfd whose
name marks every process of the instance: process discovery looks for it in
/proc/PID/fd to prove a process belongs to the instance.
"""

from __future__ import annotations

import mmap
import os

from .discovery import marker_name

STARTING, IDLE, BUSY, STOPPING = 0, 1, 2, 3
STATE_NAMES = {STARTING: "starting", IDLE: "idle", BUSY: "busy", STOPPING: "stopping"}


STATE, TASKS, ERRORS = 0, 1, 2  # the 64-bit words of a slot
WORDS_PER_SLOT = 3


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


class SlotTable:
    """The mapped array of slots, created by the master before it forks."""

    def __init__(self, name: str, count: int) -> None:
        self.fd = os.memfd_create(marker_name(os.getuid(), name), os.MFD_CLOEXEC)
        size = max(8 * WORDS_PER_SLOT * count, mmap.PAGESIZE)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        words = memoryview(self._map).cast("Q")
        self._slots = [Slot(words, i * WORDS_PER_SLOT) for i in range(count)]

    def __getitem__(self, index: int) -> Slot:
        return self._slots[index]
