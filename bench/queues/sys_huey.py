"""huey: RedisHuey and the task the `huey_consumer` processes load."""

import os

from huey import RedisHuey
from work import handle

huey = RedisHuey("bench", url=os.environ["QB_REDIS"])


@huey.task()
def job(payload):
    handle(payload)


def put_many(items):
    for item in items:  # huey has no bulk enqueue
        job(item)
