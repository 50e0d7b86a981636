"""The producer API: `from tprocess import Queue; Queue(url, "ip").put({...})`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .broker import Broker
from .jobs import check_queue_name
from .urls import open_broker


class Queue:
    """One queue of one broker, for producers. The connection opens on first use in each process."""

    def __init__(self, url: str, name: str) -> None:
        self.name = check_queue_name(name)
        self.broker: Broker = open_broker(url)

    def put(self, data: Any, delay: float = 0) -> str:
        """Add one job (visible after `delay` seconds); returns its id. PayloadError if not JSON."""
        return self.broker.put(self.name, data, delay)

    def put_many(self, items: Iterable[Any], delay: float = 0) -> list[str]:
        """Add many jobs in one round trip; every payload is checked before any is sent."""
        return self.broker.put_many(self.name, items, delay)

    def stats(self) -> dict[str, Any]:
        return self.broker.stats(self.name)[self.name]

    def close(self) -> None:
        self.broker.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
