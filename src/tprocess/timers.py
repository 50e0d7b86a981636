"""The master's timers: a heap of monotonic deadlines.

Nothing is scheduled unless something is due (a backoff restart, a stop
deadline, a hung-task check...), so an idle master sleeps in the selector with
no time-out at all. Cancelling only marks a timer; it is dropped when it reaches
the top of the heap.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import Any


class Timer:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(when, callback, args)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.call_at(time.monotonic() + delay, callback, *args)

    def timeout(self) -> float | None:
        """Seconds until the next timer is due, or None when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        if not heap:
            return None
        return max(0.0, heap[0][0] - time.monotonic())

    def run_due(self) -> None:
        """Run every timer that is due now; timers scheduled by them wait for the next turn."""
        now = time.monotonic()
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        for timer in due:
            if not timer.cancelled:
                timer.callback(*timer.args)
