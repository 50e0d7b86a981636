"""Work queues: jobs shared by the workers of one machine (SQLite) or of many (Redis streams).

| module | concern |
| --- | --- |
| `jobs.py` | the job model: `Job`, `DeadJob`, `Reject`, payload encoding, queue and consumer names |
| `broker.py` | the abstract `Broker` every broker implements |
| `urls.py` | broker URLs, the default SQLite file, `open_broker` |
| `sqlite_broker.py` | the embedded broker (stdlib sqlite3, WAL) |
| `redis_broker.py`, `redis_scripts.py` | the Redis streams broker and its Lua scripts |
| `waiting.py` | waiting without polling: inotify, and a wake-up fd |
| `producer.py` | `Queue`, the producer API |
| `consumer.py` | `run_jobs`, the consuming loop a worker runs |
| `acks.py` | acknowledgements held for the next fetch, sent by a thread of their own if a job runs long |
| `async_consumer.py` | the consuming loop of an `async def` task: `concurrency` jobs in flight per worker |
| `serving.py` | a queue group's worker: options, the broker opened after fork, the slot's state and counts |
| `depth.py` | each queue group's depth for `status` and `top`, read by the client from the broker |
| `commands.py` | `tprocess enqueue` and `tprocess queue ...` (argparse) |
"""

from .broker import Broker
from .jobs import BrokerError, DeadJob, Job, PayloadError, Reject
from .producer import Queue
from .urls import open_broker, parse_broker_url

__all__ = ["Broker", "BrokerError", "DeadJob", "Job", "PayloadError", "Queue", "Reject", "open_broker",
           "parse_broker_url"]
