"""Waiting for a job without hammering the broker: a file watch (inotify) and a poll that a
worker's wake-up fd interrupts at once."""

from __future__ import annotations

import ctypes
import math
import os
import select

IN_MODIFY = 0x00000002
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)


class FileWatch:
    """An inotify descriptor that becomes readable when a file is written (a SQLite -wal file:
    every commit by any process appends to it). `fileno()` is None when inotify is not available."""

    def __init__(self, path: str) -> None:
        self._fd: int | None = None
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return
        if _libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
            os.close(fd)
            return
        self._fd = fd

    def fileno(self) -> int | None:
        return self._fd

    def drain(self) -> None:
        if self._fd is not None:
            drain_fd(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def drain_fd(fd: int) -> None:
    """Read whatever a non-blocking descriptor holds (never blocks: polls first)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while poller.poll(0):
            if not os.read(fd, 4096):
                return
    except (BlockingIOError, InterruptedError):
        pass


def wait_for_fds(fds: list[int | None], timeout_s: float) -> set[int]:
    """Wait up to `timeout_s` for any of `fds` to be readable (None entries are skipped)."""
    poller = select.poll()
    for fd in fds:
        if fd is not None:
            poller.register(fd, select.POLLIN)
    ms = max(0, math.ceil(timeout_s * 1000))
    return {fd for fd, _ in poller.poll(ms)}
