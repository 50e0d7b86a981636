"""arq: the async job and the WorkerSettings the `arq` worker processes load."""

import asyncio
import os

from arq import create_pool
from arq.connections import RedisSettings
from work import handle_async

REDIS = RedisSettings.from_dsn(os.environ.get("QB_REDIS", "redis://127.0.0.1:6379/0"))


async def job(ctx, payload):
    await handle_async(payload)


class WorkerSettings:
    functions = [job]
    redis_settings = REDIS
    max_jobs = int(os.environ.get("QB_CONCURRENCY", "10"))  # arq's default is 10


async def _put_many(items):
    pool = await create_pool(REDIS)
    try:
        for first in range(0, len(items), 200):  # arq has no bulk enqueue: 200 at a time, concurrently
            await asyncio.gather(*(pool.enqueue_job("job", item) for item in items[first : first + 200]))
    finally:
        await pool.aclose()


def put_many(items):
    asyncio.run(_put_many(items))
