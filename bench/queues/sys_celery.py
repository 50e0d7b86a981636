"""Celery: the app the `celery worker` processes load (prefork pool, Redis broker).

QB_CELERY=late: acks_late + reject_on_worker_lost + prefetch_multiplier 1 (the safe setting);
QB_CELERY=default: Celery's defaults (ack on receipt, prefetch 4 per process).
"""

import os

from celery import Celery
from work import handle

app = Celery("qbench", broker=os.environ["QB_REDIS"])
app.conf.update(
    task_ignore_result=True, broker_connection_retry_on_startup=True, worker_hijack_root_logger=False
)
if os.environ.get("QB_CELERY", "late") == "late":
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1)


@app.task(name="job")
def job(payload):
    handle(payload)


def put_many(items):
    with app.producer_or_acquire() as producer:
        for item in items:
            job.apply_async((item,), producer=producer)
