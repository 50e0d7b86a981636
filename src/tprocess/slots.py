"""Shared memory between the master and its workers: one slot per worker index.

A worker writes its own state and counters into its slot with plain stores (no
system call on the per-task path); the master reads them for `status` and to know
which workers were busy when it had to kill them. The memory is a memfd whose
name marks every process of the instance: process discovery looks for it in
/proc/PID/fd to prove a process belongs to the instance.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from .discovery import marker_name

STARTING, IDLE, BUSY, STOPPING = 0, 1, 2, 3
STATE_NAMES = {STARTING: "starting", IDLE: "idle", BUSY: "busy", STOPPING: "stopping"}


class Slot(ctypes.Structure):
    _fields_ = [
        ("state", ctypes.c_uint64),
        ("tasks", ctypes.c_uint64),
        ("errors", ctypes.c_uint64),
    ]


class SlotTable:
    """The mapped array of slots, created by the master before it forks."""

    def __init__(self, name: str, count: int) -> None:
        self.fd = os.memfd_create(marker_name(os.getuid(), name), os.MFD_CLOEXEC)
        size = max(ctypes.sizeof(Slot) * count, mmap.PAGESIZE)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self._slots = (Slot * count).from_buffer(self._map)

    def __getitem__(self, index: int) -> Slot:
        return self._slots[index]
