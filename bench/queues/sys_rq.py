"""RQ: the job function and the bulk put (Queue.enqueue_many, one pipeline)."""

import os

from redis import Redis
from rq import Queue
from work import handle


def job(payload):
    handle(payload)


def queue():
    return Queue("bench", connection=Redis.from_url(os.environ["QB_REDIS"]))


def put_many(items, q=None):
    q = q or queue()
    q.enqueue_many([Queue.prepare_data(job, (item,)) for item in items])
