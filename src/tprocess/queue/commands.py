"""`tprocess enqueue` and `tprocess queue stats|dead|retry|purge`, for the argparse command line.

`add_queue_commands(subparsers)` adds both commands; each sets `func`, which takes the parsed
arguments and returns the exit code (0 success, 1 run-time failure, 2 usage or configuration
mistake), printing any error as one `tprocess: error: ...` line. `main(argv)` runs them alone
(`python -m tprocess.queue ...`) until the command line wires them in.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from ..config import DEFAULT_NAME, ConfigError, check_name
from .broker import Broker
from .jobs import BrokerError, PayloadError, check_queue_name, last_line
from .urls import default_broker_url, open_broker, parse_broker_url

EXIT_FAILED, EXIT_USAGE = 1, 2
BATCH = 10_000  # jobs per put_many from standard input: one transaction / one round trip each


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def add_queue_commands(subparsers: Any) -> None:
    """Add `enqueue` and `queue` to an argparse subparsers object (`parser.add_subparsers()`)."""
    add_enqueue_arguments(subparsers.add_parser(
        "enqueue", help="Add jobs to a queue.", description=ENQUEUE_DESCRIPTION))
    add_queue_arguments(subparsers.add_parser("queue", help=QUEUE_DESCRIPTION, description=QUEUE_DESCRIPTION))


ENQUEUE_DESCRIPTION = ("Add jobs to QUEUE: each JSON argument is one job; with none, one JSON document per "
                       "line of standard input.")
QUEUE_DESCRIPTION = "See and handle the jobs of queues: stats, dead, retry, purge."
VALUE_FLAGS = {flag: long for long, flags in (("--config", ("-c", "--config")), ("--broker", ("--broker",)),
                                              ("--name", ("--name",)), ("--delay", ("--delay",)))
               for flag in flags}  # options that take a value (for the command line's option gluing)


def add_enqueue_arguments(enqueue: argparse.ArgumentParser) -> None:
    """`tprocess enqueue`'s arguments; sets `func`."""
    _broker_options(enqueue)
    enqueue.add_argument("queue", metavar="QUEUE")
    enqueue.add_argument("jobs", nargs="*", metavar="JSON", help="a job's payload as JSON")
    enqueue.add_argument("--delay", type=float, default=0.0, help="seconds before the jobs are visible")
    enqueue.set_defaults(func=_one_line_errors(cmd_enqueue))


def add_queue_arguments(queue: argparse.ArgumentParser) -> None:
    """`tprocess queue ACTION`'s arguments; each action sets `func`."""
    _broker_options(queue)
    actions = queue.add_subparsers(dest="queue_action", metavar="ACTION", required=True)
    stats = actions.add_parser(
        "stats", help="Per queue: waiting, delayed, running, done in the last minute, dead.")
    stats.add_argument("queue", metavar="QUEUE", nargs="?", help="only this queue")
    dead = actions.add_parser("dead", help="The dead-letter list of QUEUE: id, attempts, last error.")
    dead.add_argument("queue", metavar="QUEUE")
    for sub in (stats, dead):
        sub.add_argument("--json", action="store_true", help="print JSON")
    retry = actions.add_parser("retry", help="Put dead jobs of QUEUE (all, or those IDs) back in the queue.")
    retry.add_argument("queue", metavar="QUEUE")
    retry.add_argument("ids", nargs="*", metavar="ID")
    purge = actions.add_parser("purge", help="Delete every job of QUEUE (asks first, unless --yes).")
    purge.add_argument("queue", metavar="QUEUE")
    purge.add_argument("--yes", action="store_true", help="do not ask")
    for sub in (stats, dead, retry, purge):
        _broker_options(sub, nested=True)
    stats.set_defaults(func=_one_line_errors(cmd_queue_stats))
    dead.set_defaults(func=_one_line_errors(cmd_queue_dead))
    retry.set_defaults(func=_one_line_errors(cmd_queue_retry))
    purge.set_defaults(func=_one_line_errors(cmd_queue_purge))


def _broker_options(parser: argparse.ArgumentParser, nested: bool = False) -> None:
    """-c/--config, --broker, --name: accepted before and after the `queue` action."""
    default = argparse.SUPPRESS if nested else None
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", dest="config_file", metavar="FILE", default=default,
                       help="TOML file whose top-level `broker` is used")
    where.add_argument("--broker", metavar="URL", default=default,
                       help="sqlite:///PATH or redis://HOST:PORT/DB")
    parser.add_argument("--name", metavar="NAME", default=default,
                        help=f"instance whose default SQLite file is used (default {DEFAULT_NAME!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tprocess")
    add_queue_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _one_line_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ConfigError, PayloadError) as exc:
            return _fail(str(exc), EXIT_USAGE)
        except BrokerError as exc:
            return _fail(str(exc), EXIT_FAILED)
        except CommandError as exc:
            return _fail(str(exc), exc.code)
        except KeyboardInterrupt:
            return _fail("interrupted", 130)
    return run


def _fail(message: str, code: int) -> int:
    print(f"tprocess: error: {message}", file=sys.stderr)
    return code


# --- which broker -------------------------------------------------------------------------


def broker_url_for(config_file: str | None, broker: str | None, name: str | None) -> tuple[str, str | None]:
    """The broker URL (and the folder relative sqlite paths start from): --broker, the config file's
    `broker`, or the instance's default SQLite file (whose folder is created)."""
    if broker is not None:
        return parse_broker_url(broker).url, None
    if config_file is not None:
        from ..config import load_file

        config = load_file(config_file)  # the whole file is checked, as `start` would
        if config.broker is not None:
            return config.broker, config.base_dir
        name = name or config.name
    name = check_name(name or DEFAULT_NAME)
    url = default_broker_url(name)
    folder = os.path.dirname(url.removeprefix("sqlite://"))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise BrokerError(f"state folder {folder!r}: {exc.strerror}") from None
    return url, None


def _open(args: argparse.Namespace) -> Broker:
    url, _ = broker_url_for(getattr(args, "config_file", None), getattr(args, "broker", None),
                            getattr(args, "name", None))
    return open_broker(url, retry_for=0)  # a command fails at once, with one line


# --- enqueue ------------------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> int:
    queue = check_queue_name(args.queue)
    if args.delay < 0 or args.delay != args.delay:
        raise ConfigError(f"--delay {args.delay}: expected seconds, 0 or more")
    with _open(args) as broker:
        if args.jobs:
            payloads = [_checked_json(text, f"argument {i}") for i, text in enumerate(args.jobs, 1)]
            for job_id in broker.put_encoded(queue, payloads, args.delay):
                print(job_id)
            return 0
        count, seconds = enqueue_lines(broker, queue, sys.stdin.buffer, args.delay)
    rate = f" ({count / seconds:,.0f} jobs/s)" if seconds > 0 and count >= BATCH else ""
    print(f"{count} jobs enqueued in queue {queue}{rate}", file=sys.stderr)
    return 0


def enqueue_lines(broker: Broker, queue: str, stream: IO[bytes], delay: float = 0.0) -> tuple[int, float]:
    """Put one job per non-empty line, in batches of BATCH; returns (jobs, seconds taken).
    A line that is not JSON stops the load with an error naming it (earlier batches stay in)."""
    started = time.monotonic()
    count = 0
    for batch in _batches(_json_lines(stream), BATCH):
        broker.put_encoded(queue, batch, delay)
        count += len(batch)
    return count, time.monotonic() - started


def _json_lines(stream: IO[bytes]) -> Iterator[str]:
    for number, raw in enumerate(stream, 1):
        line = raw.strip()
        if line:
            try:
                yield _checked_json(line.decode(), f"standard input line {number}")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"standard input line {number}: not UTF-8: {exc}") from None


def _checked_json(text: str, where: str) -> str:
    try:
        json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None
    return text.strip()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- queue stats | dead | retry | purge -----------------------------------------------------


def cmd_queue_stats(args: argparse.Namespace) -> int:
    with _open(args) as broker:
        stats = broker.stats(args.queue)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    rows = [["QUEUE", "WAITING", "DELAYED", "RUNNING", "DONE/MIN", "DEAD"]]
    rows += [[name, *(str(s[k]) for k in ("waiting", "delayed", "running", "done_last_minute", "dead"))]
             for name, s in stats.items()]
    _print_table(rows)
    for name, s in stats.items():
        for consumer, held in sorted(s.get("consumers", {}).items()):
            if held:
                print(f"  {name}: {consumer} holds {held}")
    if not stats:
        print("no queue yet")
    return 0


def cmd_queue_dead(args: argparse.Namespace) -> int:
    with _open(args) as broker:
        jobs = broker.dead_jobs(args.queue)
    if args.json:
        print(json.dumps([job.__dict__ for job in jobs], indent=2))
        return 0
    rows = [["ID", "ATTEMPTS", "FAILED", "LAST ERROR"]]
    rows += [[job.id, str(job.attempts), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.failed_at)),
              _short(last_line(job.error), 80)] for job in jobs]
    _print_table(rows)
    print(f"{len(jobs)} dead jobs in queue {args.queue}")
    return 0


def cmd_queue_retry(args: argparse.Namespace) -> int:
    with _open(args) as broker:
        moved = broker.retry_dead(args.queue, args.ids or None)
    print(f"{len(moved)} dead jobs of queue {args.queue} back in the queue")
    missing = sorted(set(args.ids) - set(moved))
    if missing:
        raise CommandError(f"queue {args.queue}: no dead job with id {', '.join(missing)}")
    return 0


def cmd_queue_purge(args: argparse.Namespace) -> int:
    queue = check_queue_name(args.queue)
    with _open(args) as broker:
        if not args.yes:
            counts = broker.stats(queue)[queue]
            total = sum(counts[k] for k in ("waiting", "delayed", "running", "dead"))
            print(f"purge queue {queue} of {broker.url}: {total} jobs "
                  f"({counts['waiting']} waiting, {counts['delayed']} delayed, {counts['running']} running, "
                  f"{counts['dead']} dead)? [y/N] ", end="", file=sys.stderr, flush=True)
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                raise CommandError(
                    f"purge of queue {queue} not confirmed (nothing deleted; --yes skips the question)")
        count = broker.purge(queue)
    print(f"{count} jobs purged from queue {queue}")
    return 0


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
