"""The Python API: build and run a supervisor from code (foreground).

    python examples/api_example.py          # Ctrl-C, or `tprocess stop --name api-demo`
"""

from __future__ import annotations

import os

from tprocess import Supervisor


def open_db(ctx):
    ctx.db = {"opened_by": os.getpid()}  # after fork: each worker has its own


def close_db(ctx):
    ctx.db = None


def scan(ctx):
    ctx.log.info("%s scanning with %s", ctx.name, ctx.db)
    ctx.sleep(2)


def main() -> int:
    sup = Supervisor("api-demo", graceful_timeout=10)
    sup.add_group("ip", task=scan, workers=3, setup=open_db, teardown=close_db)
    sup.add_group("domain", task=scan, workers=1, setup=open_db, teardown=close_db)
    return sup.run()


if __name__ == "__main__":
    raise SystemExit(main())
