"""The depth of each queue group's queue, for `status` and `top`.

The master never talks to a broker for a status request (a slow or lost broker must not stall its
event loop): it sends the broker's URL and each group's queue name, and the client asks the broker.
"""

from __future__ import annotations

from typing import Any

from .broker import Broker
from .jobs import BrokerError
from .urls import open_broker

DEPTH_KEYS = ("waiting", "delayed", "running", "dead", "done_last_minute")
_brokers: dict[str, Broker] = {}  # kept open between the samples of `top`


def add_queue_depths(status: dict[str, Any]) -> None:
    """Fill in groups[].queue (`{"name": ...}` from the master) with the queue's depth, or an error."""
    url = status.get("broker")
    queues = [g["queue"] for g in status.get("groups") or []
              if isinstance(g, dict) and isinstance(g.get("queue"), dict) and g["queue"].get("name")]
    if not url or not queues:
        return
    try:
        stats = _broker(url).stats()
    except (BrokerError, ImportError, ValueError) as exc:
        _forget(url)
        for queue in queues:
            queue["error"] = str(exc)
        return
    for queue in queues:
        depth = stats.get(queue["name"], {})
        queue.update({key: int(depth.get(key) or 0) for key in DEPTH_KEYS})


def _forget(url: str) -> None:
    broker = _brokers.pop(url, None)
    if broker is not None:
        try:
            broker.close()
        except BrokerError:
            pass


def _broker(url: str) -> Broker:
    broker = _brokers.get(url)
    if broker is None:
        broker = _brokers[url] = open_broker(url, retry_for=0)  # a status answers at once, or says why
    return broker
