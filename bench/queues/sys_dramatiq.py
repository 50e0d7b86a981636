"""dramatiq: the Redis broker and the actor the `dramatiq` worker processes load."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from work import handle

broker = RedisBroker(url=os.environ["QB_REDIS"])
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench")
def job(payload):
    handle(payload)


def put_many(items):
    for item in items:  # dramatiq has no bulk enqueue for Redis
        job.send(item)
