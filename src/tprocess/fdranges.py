"""The master's own descriptors, kept as runs of consecutive numbers.

Every newly forked worker must close the master's descriptors (its selector's: the
control socket and connections, the wake-up, ready and report channels, the socket to
the output process). The workers' own pipes are read by the output process
(collector.py), so they are few; still, walking the master's objects in the child
would copy their pages into every worker. So the master's selector keeps its
descriptors as sorted runs `[lo, hi)`, updated in O(log R) per register/unregister
(R runs: few, since the kernel hands out the lowest free numbers), and the child
closes each run with one close_range(2) call.
"""

from __future__ import annotations

import selectors
from bisect import bisect_right

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import Any


class FdRanges:
    """A set of descriptors as sorted, disjoint, non-adjacent runs [lo, hi)."""

    __slots__ = ("_lo", "_hi")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def add(self, fd: int) -> None:
        lo, hi = self._lo, self._hi
        i = bisect_right(lo, fd)  # runs before i start at or below fd
        if i and hi[i - 1] > fd:
            return  # already in
        joins_left = bool(i) and hi[i - 1] == fd
        joins_right = i < len(lo) and lo[i] == fd + 1
        if joins_left and joins_right:  # fd fills the gap between two runs
            hi[i - 1] = hi[i]
            del lo[i], hi[i]
        elif joins_left:
            hi[i - 1] = fd + 1
        elif joins_right:
            lo[i] = fd
        else:
            lo.insert(i, fd)
            hi.insert(i, fd + 1)

    def discard(self, fd: int) -> None:
        lo, hi = self._lo, self._hi
        i = bisect_right(lo, fd) - 1
        if i < 0 or hi[i] <= fd:
            return  # not in
        start, end = lo[i], hi[i]
        if end - start == 1:
            del lo[i], hi[i]
        elif fd == start:
            lo[i] = fd + 1
        elif fd == end - 1:
            hi[i] = fd
        else:  # split the run around fd
            hi[i] = fd
            lo.insert(i + 1, fd + 1)
            hi.insert(i + 1, end)

    def __contains__(self, fd: object) -> bool:
        if not isinstance(fd, int):
            return False
        i = bisect_right(self._lo, fd) - 1
        return i >= 0 and self._hi[i] > fd

    def __len__(self) -> int:
        return sum(h - lo for lo, h in zip(self._lo, self._hi, strict=True))

    def ranges(self) -> list[tuple[int, int]]:
        """The runs, [lo, hi) each, in order: a copy (O(R))."""
        return list(zip(self._lo, self._hi, strict=True))


class TrackedSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The default selector, keeping its registered descriptors in `fds` as it goes."""

    def __init__(self) -> None:
        super().__init__()
        self.fds = FdRanges()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = super().register(fileobj, events, data)
        self.fds.add(key.fd)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = super().unregister(fileobj)
        self.fds.discard(key.fd)
        return key


def ranges_with(ranges: list[tuple[int, int]], fds: list[int]) -> list[tuple[int, int]]:
    """`ranges` plus a few single descriptors (negative ones: none)."""
    return ranges + [(fd, fd + 1) for fd in fds if fd >= 0]


def merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The same descriptors as fewer runs: overlapping and adjacent runs joined. A spawn
    batch's pipes are consecutive numbers, 4 per worker: each child closes them with one
    close_range(2) call instead of 128 (~0.1 ms of each child's start: issue 8)."""
    joined: list[tuple[int, int]] = []
    for lo, hi in sorted(runs):
        if joined and lo <= joined[-1][1]:
            if hi > joined[-1][1]:
                joined[-1] = (joined[-1][0], hi)
        else:
            joined.append((lo, hi))
    return joined
