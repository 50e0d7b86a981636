"""The seed's scenario: every worker's task is `sleep(5)`, interruptible by a stop."""

import os


def work(ctx):
    # The blog's worker: do the job (here: nothing), then sleep 5 s. ctx.sleep wakes
    # at once when a stop is asked, so `tprocess stop` never waits out the sleep.
    ctx.sleep(5)


def scan_ip(ctx):
    ctx.log.debug("%s scanning an ip", ctx.name)
    ctx.sleep(5)


def scan_domain(ctx):
    ctx.log.debug("%s scanning a domain", ctx.name)
    ctx.sleep(5)


def open_db(ctx):
    # Runs once in each worker after fork: open connections here, not in the master.
    ctx.db = {"pid": os.getpid()}


def close_db(ctx):
    ctx.db = None
