"""The job model shared by every broker: `Job`, `Reject`, payload encoding, queue names, consumer names."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class Reject(Exception):  # noqa: N818 - the name users raise: `raise tprocess.Reject("bad input")`
    """Raised by a job task: the job goes straight to the dead-letter list, with no retry."""


class PayloadError(TypeError, ValueError):
    """A job payload that cannot be stored as JSON (refused at put, before anything is sent)."""


class BrokerError(Exception):
    """A broker failed at run time (unreachable, read-only or full file system): one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass
class Job:
    """One delivery of a job. `attempt` is 1 on the first delivery and grows with each redelivery."""

    id: str
    data: Any
    attempt: int
    queue: str
    enqueued_at: float  # wall-clock seconds since the epoch (a timestamp to show, never a deadline)
    receipt: Any = field(default=None, repr=False, compare=False)  # the broker's handle on this delivery


@dataclass
class DeadJob:
    """A job in the dead-letter list: its payload as stored (text), attempts made, and the last error."""

    id: str
    data: str
    attempts: int
    queue: str
    enqueued_at: float
    failed_at: float
    error: str


def encode_payload(data: Any) -> str:
    """JSON text for a payload; PayloadError (a TypeError and a ValueError) when it is not JSON."""
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"job payload is not JSON-serializable: {exc}") from None


def decode_payload(text: str | bytes) -> Any:
    """The payload back from the store; ValueError when the stored text is not valid JSON."""
    return json.loads(text)


def check_queue_name(name: Any) -> str:
    """A queue name: 1 to 100 letters, digits, `_`, `-` or `.`; ConfigError otherwise."""
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        shown = name if not isinstance(name, str) or len(name) <= 120 else name[:117] + "..."
        raise ConfigError(
            f"queue name {shown!r}: expected 1 to 100 letters, digits, '_', '-' or '.'"
        )
    return name


def consumer_name(worker_title: str, instance: str | None = None) -> str:
    """HOST:INSTANCE:WORKER-TITLE, so that `queue stats` shows who holds which job on many machines."""
    host = socket.gethostname()
    return f"{host}:{instance}:{worker_title}" if instance else f"{host}:{worker_title}"


def last_line(text: str) -> str:
    """The last non-empty line of an error text (a traceback's exception line), for one-line listings."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
