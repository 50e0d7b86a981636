"""The `tprocess` command: start, stop, status, top, logs, reload, scale, enqueue, queue.

Exit codes: 0 success; 1 a command failed at run time (start-up failed, stop had
to kill a worker mid-task, the instance is not running for logs/reload/scale, a
reload or scale failed); 2 a usage or configuration mistake; 3 `status` of an
instance that is not running (the LSB convention).

The grammar is argparse's (arguments.py), except for the plain forms of `start`, `stop`
and `status`, read here; every import off the path of stop/status/scale/reload is lazy:
these commands answer within a few milliseconds of a bare interpreter.
"""

from __future__ import annotations

import os
import sys
import types

from . import __version__, control
from .checks import DEFAULT_NAME, ConfigError, check_name, check_seconds

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import socket
    from collections.abc import Callable
    from typing import Any

    from .config import Config

VERSION = f"tprocess, version {__version__}"
EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 1, 2, 3
EXIT_INTERRUPTED = 130
STOP_MARGIN = 30.0  # extra seconds stop waits for a master beyond the graceful timeout
STOP_NAMED = 20  # workers named in stop's line; past that, a count (a pool of 2,000 is one line)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UserError(Exception):
    """One line for the user, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> None:
    """The console script: run one command and exit with its code."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        _fail(str(exc), exc.code)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `tprocess logs | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        code = 0
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of every module: ~4 ms of each command
    (issue 8: a `stop` is the command's own start-up and exit plus the pool's). Nothing of
    ours waits for it: what a command writes is written with os.write or flushed here, and
    what it stores (a queue's jobs) is committed before it returns."""
    for stream in (sys.stdout, sys.stderr):  # None if the command started with it closed
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run(argv: list[str]) -> int:
    """Parse argv and run the command; return its exit code (UserError on a mistake)."""
    if not argv:
        raise UserError(f"missing command: one of {', '.join(COMMANDS)} (see tprocess --help)")
    if argv == ["--version"]:  # argparse would build every command's parser (~30 ms) to print it
        print(VERSION)
        return 0
    args = plain_arguments(argv)
    if args is None:
        from .arguments import parse

        args = parse(argv)
    return args.run(args)


# The plain forms of the commands that scripts, monitors and deploys run most, read without
# argparse (with the `re` and `enum` it imports, ~7 ms of each `stop`; in `start`, ~0.4 MiB
# that the master and every worker would inherit): per command, the options that take a value,
# the switches (flag -> attribute) and the positional's attribute. Any other word (another
# option, a second positional, -h, a missing value, a malformed number) goes to argparse, which
# answers as for any command; test_cli checks that both read every argv alike.
INSTANCE_OPTIONS = {"--name": "name", "-c": "config_file", "--config": "config_file"}
PLAIN_FORMS: dict[str, tuple[dict[str, str], dict[str, str], str | None]] = {
    "stop": (INSTANCE_OPTIONS | {"--timeout": "timeout"}, {}, None),
    "status": (INSTANCE_OPTIONS, {"--json": "as_json"}, None),
    "start": (INSTANCE_OPTIONS | {"-n": "workers", "--workers": "workers", "--log-file": "log_file",
                                  "--graceful-timeout": "graceful_timeout", "--log-level": "log_level",
                                  "--metrics": "metrics"},
              {"-d": "daemon", "--daemon": "daemon"}, "task"),
}
PLAIN_DEFAULTS = {"log_level": "INFO"}


def log_level(text: str) -> str:
    """--log-level's value, in capitals; ValueError if it is not one of LOG_LEVELS."""
    if text.upper() not in LOG_LEVELS:
        raise ValueError(text)
    return text.upper()


PLAIN_TYPES: dict[str, Callable[[str], Any]] = {
    "timeout": float, "graceful_timeout": float, "workers": int, "log_level": log_level}


def plain_arguments(argv: list[str]) -> types.SimpleNamespace | None:
    """argv's arguments if it is a plain form of its command, else None (argparse decides)."""
    if argv[0] not in PLAIN_FORMS:
        return None
    takes_value, switches, positional = PLAIN_FORMS[argv[0]]
    args: dict[str, Any] = dict.fromkeys(takes_value.values()) | dict.fromkeys(switches.values(), False)
    if positional:
        args[positional] = None
    args |= {key: value for key, value in PLAIN_DEFAULTS.items() if key in args}
    words = iter(argv[1:])
    for word in words:
        flag, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if flag in takes_value:
            value = value if equals else next(words, None)  # the next word, whatever it is
            if value is None or value == "--":  # argparse would read "--" as no value at all
                return None
            attribute = takes_value[flag]
            try:  # each one, as argparse does: a malformed one is a mistake even if given again
                args[attribute] = PLAIN_TYPES.get(attribute, str)(value)
            except ValueError:
                return None
        elif word in switches:
            args[switches[word]] = True
        elif positional and not word.startswith("-") and args[positional] is None:
            args[positional] = word
        else:
            return None
    return types.SimpleNamespace(run=COMMANDS[argv[0]][1], **args)


def _fail(message: str, code: int) -> None:
    print(f"tprocess: error: {message}", file=sys.stderr)
    sys.exit(code)


def _instance_name(args: argparse.Namespace) -> str:
    name = args.name
    if name is None and args.config_file:
        from .config import load_file

        name = load_file(args.config_file).name
    return check_name(DEFAULT_NAME if name is None else name, "--name")


# --- start -------------------------------------------------------------------------


def start(args: argparse.Namespace) -> int:
    from .supervisor import StartError, Supervisor

    config = _start_config(args.task, args.workers, args.config_file)
    if args.metrics is not None:
        _set_metrics(config, args.metrics)
    options = {"name": args.name, "log_file": args.log_file, "graceful_timeout": args.graceful_timeout,
               "metrics": args.metrics}
    for key, value in options.items():
        if value is not None:  # kept over a reload, which reads the config file again
            setattr(config, key, value)
            config.overrides[key] = value
    sup = Supervisor(config=config)
    try:
        if not args.daemon:
            return sup.run(args.log_level)
        result = sup.start_detached(args.log_level)
    except StartError as exc:
        raise UserError(str(exc), EXIT_FAILED) from None
    print(f"tprocess {config.name!r} started: master pid {result.master_pid}, "
          f"{result.workers} workers (log: {result.log_file})")
    return 0


def _set_metrics(config: Config, address: str) -> None:
    """--metrics HOST:PORT overrides the config's `metrics` (validated with the rest of the config)."""
    if not hasattr(config, "metrics"):
        raise UserError("--metrics: this version of tprocess has no metrics endpoint")
    config.metrics = address


def _start_config(task: str | None, workers: int | None, config_file: str | None) -> Config:
    from .config import load_file
    from .supervisor import one_task_config

    if config_file and task:
        raise UserError("give either a TASK or -c/--config, not both")
    if config_file:
        if workers is not None:
            raise UserError("-n/--workers applies to a TASK; set workers per group in the config file")
        return load_file(config_file)
    if not task:
        raise UserError("missing TASK (FILE.py:function or module:function) or -c/--config FILE")
    return one_task_config(DEFAULT_NAME, task, 1 if workers is None else workers)


# --- stop ---------------------------------------------------------------------------


def stop(args: argparse.Namespace) -> int:
    name = _instance_name(args)
    timeout = args.timeout
    if timeout is not None:
        check_seconds(timeout, "--timeout")
    try:
        conn = control.connect(name)
    except control.NotRunning:
        return _stop_leftovers(name, timeout)
    with conn:
        return _stop_master(name, conn, timeout)


def _stop_master(name: str, conn: socket.socket, timeout: float | None) -> int:
    import select

    master_pid = control.peer_pid(conn)
    pidfd = os.pidfd_open(master_pid)  # valid: the master holds this connection open
    reply = None
    try:
        control.send(conn, {"cmd": "stop", "timeout": timeout})
        conn.settimeout(None if timeout is None else timeout + STOP_MARGIN)
        reply = control.receive(conn)
        select.select([pidfd], [], [], STOP_MARGIN)  # returns when the master has exited
    except (OSError, ValueError):
        pass  # the master died (or hung) before it could answer
    finally:
        os.close(pidfd)
    if reply is None:
        print(f"tprocess: error: the master (pid {master_pid}) ended without reporting "
              "the stop; stopping what it left", file=sys.stderr)
        _stop_leftovers(name, timeout)
        return EXIT_FAILED
    print(f"stopped {name}-master (pid {master_pid}) and {len(reply['stopped'])} workers"
          + _named(reply["stopped"]))
    for w in reply["killed"]:
        what = "cut mid-task" if w["state"] == "busy" else f"killed while {w['state']}"
        print(f"{what}: {w['name']} (pid {w['pid']}) did not stop in time", file=sys.stderr)
    return EXIT_FAILED if reply["killed"] else 0


def _named(workers: list[dict[str, Any]]) -> str:
    """': a (pid 1), b (pid 2)', the first STOP_NAMED of them: the log names every one."""
    if not workers:
        return ""
    names = ", ".join(f"{w['name']} (pid {w['pid']})" for w in workers[:STOP_NAMED])
    more = len(workers) - STOP_NAMED
    return f": {names}" + (f" and {more} more (each named in the log)" if more > 0 else "")


def _stop_leftovers(name: str, timeout: float | None) -> int:
    from . import discovery

    leftovers = discovery.find_instance(name)
    if not leftovers:
        print(f"tprocess {name!r} is not running")
        return 0
    stopped, killed = discovery.stop_processes(leftovers, 30.0 if timeout is None else timeout)
    print(f"stopped {len(leftovers)} leftover processes of {name!r} whose master had died: "
          + ", ".join(ref.describe() for ref in stopped))
    for ref in killed:
        print(f"killed {ref.describe()}: it did not stop in time", file=sys.stderr)
    return EXIT_FAILED if killed else 0


# --- status ----------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    name = _instance_name(args)
    try:
        _, reply = control.request(name, {"cmd": "status"})
    except control.NotRunning:
        return _status_not_running(name, args.as_json)
    except (OSError, ValueError) as exc:  # includes a time-out: the master did not answer
        raise UserError(f"the master of {name!r} did not answer: {exc or type(exc).__name__}",
                        EXIT_FAILED) from None
    _add_memory(reply)
    if reply.get("broker"):
        from .queue.depth import add_queue_depths  # only for an instance with queue groups

        add_queue_depths(reply)
    if args.as_json:
        print(_status_json(reply))
    else:
        from .status_view import render

        render(reply)
    return 0


def _add_memory(reply: dict) -> None:
    """Each process's resident memory, from /proc/PID/statm (what psutil reads, at a third
    of its cost per process; os.open rather than open(): 2,000 workers in ~12 ms, not 29)."""
    page = os.sysconf("SC_PAGE_SIZE")
    for proc in [reply["master"], *reply["workers"]]:
        proc["rss"] = None
        if proc["pid"]:
            try:
                fd = os.open(f"/proc/{proc['pid']}/statm", os.O_RDONLY)
                try:
                    proc["rss"] = int(os.read(fd, 256).split()[1]) * page
                finally:
                    os.close(fd)
            except (OSError, ValueError, IndexError):
                pass


def _status_json(reply: dict) -> str:
    """Indented JSON with one line per worker: json's indenting encoder is pure Python
    (50 ms for 2,000 workers), its compact one C (a few ms)."""
    import json

    workers = reply.get("workers") or []
    head = json.dumps({k: v for k, v in reply.items() if k != "workers"}, indent=2)
    if not workers:
        return head[:-2] + ',\n  "workers": []\n}'
    encode = json.JSONEncoder().encode  # one encoder for every row
    rows = ",\n    ".join(map(encode, workers))
    return head[:-2] + f',\n  "workers": [\n    {rows}\n  ]\n}}'


def _status_not_running(name: str, as_json: bool) -> int:
    from . import discovery

    leftovers = discovery.find_instance(name)
    if as_json:
        import json

        print(json.dumps({"name": name, "master": None, "leftovers": [
            {"name": r.title, "pid": r.pid} for r in leftovers]}))
    else:
        print(f"tprocess {name!r} is not running")
        if leftovers:
            print(f"{len(leftovers)} leftover processes whose master died: "
                  + ", ".join(r.describe() for r in leftovers)
                  + "; `tprocess stop` ends them")
    return EXIT_NOT_RUNNING


# --- logs, reload, scale (in commands.py) ---------------------------------------------


def top(args: argparse.Namespace) -> int:
    from .top_view import run

    return run(_instance_name(args), args.interval)


def logs(args: argparse.Namespace) -> int:
    from .client import logs_command

    return logs_command(_instance_name(args), args.config_file, args.lines, args.follow)


def reload(args: argparse.Namespace) -> int:
    from .client import reload_command

    return reload_command(_instance_name(args))


def scale(args: argparse.Namespace) -> int:
    from .client import parse_count, scale_command

    count = parse_count(args.count)  # a malformed COUNT is a usage error before anything is sent
    return scale_command(_instance_name(args), args.group, count)


def run_queue_command(args: argparse.Namespace) -> int:
    """enqueue, queue ACTION: their handlers print their own one-line errors (queue/commands.py)."""
    return args.func(args)


# name -> (summary, handler); the order of --help
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "start": ("Start an instance running TASK (FILE.py:function or module:function), "
              "or the groups of a config file.", start),
    "stop": ("Stop an instance: every worker finishes its task, then all exit.", stop),
    "status": ("Show the master and each worker; exit 0 if running, 3 if not.", status),
    "top": ("A live view of an instance's workers, groups and log; q or Ctrl-C quits.", top),
    "logs": ("Print the last lines of an instance's log; -f follows it.", logs),
    "reload": ("Replace every worker with one running the current code and config, one at a time; "
               "returns when done.", reload),
    "scale": ("Set a group's number of workers: COUNT, or +K / -K.", scale),
    "enqueue": ("Add jobs to a queue: JSON arguments, or one JSON document per line of standard input.",
                run_queue_command),
    "queue": ("See and handle the jobs of queues: stats, dead QUEUE, retry QUEUE [ID ...], purge QUEUE.",
              run_queue_command),
}
