"""The one task every contestant runs, by payload kind; results go to $QB_RECORDS.

- `{"k": "e"}` empty job: writes one byte (the harness counts bytes: N bytes = N jobs done);
- `{"k": "l", "t": PUT_NS}` latency probe: writes `PUT_NS START_NS` (CLOCK_MONOTONIC, same on the machine);
- `{"k": "a", "s": 0.05}` async job: awaits (or, for thread pools, sleeps) `s` seconds, then one byte;
- `{"k": "s", "n": N, "s": S}` kill probe: writes `S PID N`, sleeps S seconds, writes `E PID N`.

One `os.write` on an O_APPEND fd per record: lines of different processes never mix.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

_fd: list[int] = []


def record(data: bytes) -> None:
    if not _fd or _fd[1] != os.getpid():  # one fd per process, opened after the fork
        _fd[:] = [
            os.open(os.environ["QB_RECORDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
            os.getpid(),
        ]
    os.write(_fd[0], data)


def handle(payload: dict[str, Any]) -> None:
    """The task of a synchronous worker (threads sleep for the "a" kind)."""
    kind = payload["k"]
    if kind == "e":
        record(b".")
    elif kind == "l":
        record(f"{payload['t']} {time.monotonic_ns()}\n".encode())
    elif kind == "a":
        time.sleep(payload["s"])
        record(b".")
    elif kind == "s":
        record(f"S {os.getpid()} {payload['n']}\n".encode())
        time.sleep(payload["s"])
        record(f"E {os.getpid()} {payload['n']}\n".encode())


async def handle_async(payload: dict[str, Any]) -> None:
    """The task of an asyncio worker."""
    if payload["k"] == "a":
        await asyncio.sleep(payload["s"])
        record(b".")
    else:
        handle(payload)


def payloads(kind: str, count: int, seconds: float = 0.05) -> list[dict[str, Any]]:
    if kind == "e":
        return [{"k": "e"} for _ in range(count)]
    if kind == "a":
        return [{"k": "a", "s": seconds} for _ in range(count)]
    if kind == "s":  # the kill probe: 8 s, long enough to be killed in the middle
        return [{"k": "s", "n": n + 1, "s": 8} for n in range(count)]
    raise ValueError(kind)
