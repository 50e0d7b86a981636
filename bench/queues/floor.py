"""The floor: the least a Python Redis-streams consumer can do per job.

    python floor.py REDIS_URL PROCESSES [CONCURRENCY]

N forked processes; each makes one pipelined round trip per batch: XACK of the previous batch +
XREADGROUP COUNT 64 BLOCK. With CONCURRENCY, each process runs an asyncio loop (uvloop when
installed) with up to CONCURRENCY jobs in flight. No retries, no redelivery, no supervision.
"""

import asyncio
import json
import os
import signal
import sys

import redis
from work import handle, handle_async

STREAM, GROUP, BATCH = "floor", "g", 64


def consume(url: str, name: str) -> None:
    r = redis.Redis.from_url(url)
    acks: list[bytes] = []
    while True:
        pipe = r.pipeline(transaction=False)
        if acks:
            pipe.xack(STREAM, GROUP, *acks)
        pipe.xreadgroup(GROUP, name, {STREAM: ">"}, count=BATCH, block=1000)
        acks = []
        for _, entries in pipe.execute()[-1] or []:
            for entry_id, fields in entries:
                handle(json.loads(fields[b"d"]))
                acks.append(entry_id)


async def consume_async(url: str, name: str, concurrency: int) -> None:
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(url)
    done: list[bytes] = []
    running: set[asyncio.Task] = set()
    room = asyncio.Event()

    async def run(entry_id: bytes, payload: dict) -> None:
        await handle_async(payload)
        done.append(entry_id)
        running.discard(asyncio.current_task())  # before the wake-up: the loop sees the free place
        room.set()

    while True:
        free = concurrency - len(running)
        if free == 0:
            room.clear()
            await room.wait()
            continue
        pipe = r.pipeline(transaction=False)
        if done:
            pipe.xack(STREAM, GROUP, *done)
            done = []
        pipe.xreadgroup(GROUP, name, {STREAM: ">"}, count=min(BATCH, free), block=5 if running else 1000)
        for _, entries in (await pipe.execute())[-1] or []:
            for entry_id, fields in entries:
                task = asyncio.create_task(run(entry_id, json.loads(fields[b"d"])))
                running.add(task)


def child(url: str, index: int, concurrency: int) -> None:
    name = f"floor-{index}"
    if not concurrency:
        consume(url, name)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(consume_async(url, name, concurrency))


def main() -> None:
    url, procs = sys.argv[1], int(sys.argv[2])
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    pids = []
    for index in range(procs):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            child(url, index, concurrency)
            os._exit(0)
        pids.append(pid)

    def stop(signum, frame):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    for pid in pids:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


if __name__ == "__main__":
    main()
