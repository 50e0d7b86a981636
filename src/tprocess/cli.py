"""The `tprocess` command: start, stop, status, top, logs, reload, scale, enqueue, queue.

Exit codes: 0 success; 1 a command failed at run time (start-up failed, stop had
to kill a worker mid-task, the instance is not running for logs/reload/scale, a
reload or scale failed); 2 a usage or configuration mistake; 3 `status` of an
instance that is not running (the LSB convention).

Built on argparse, and every import off the path of stop/status/scale/reload is
lazy: these commands answer within a few milliseconds of a bare interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, control
from .checks import DEFAULT_NAME, ConfigError, check_name, check_seconds

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import Any

    from .config import Config

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
    if argv[0] in COMMANDS:
        # only the command's own parser: building all six costs milliseconds (gettext, formatters)
        parser = Parser(prog=f"tprocess {argv[0]}", description=COMMANDS[argv[0]][0],
                        allow_abbrev=False, formatter_class=Formatter)
        value_flags = add_options(argv[0], parser)
        args = parser.parse_args(glue_option_values(argv[1:], value_flags))
    elif argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        raise UserError(f"unrecognized option {argv[0]!r}: the command comes first "
                        f"(one of {', '.join(COMMANDS)})")
    else:  # --help, --version or an unknown command: the full parser answers
        args = build_parser().parse_args(argv)
    return args.run(args)


def _fail(message: str, code: int) -> None:
    print(f"tprocess: error: {message}", file=sys.stderr)
    sys.exit(code)


# --- the parser ----------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one `tprocess: error:` line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message, EXIT_USAGE)


class Formatter(argparse.HelpFormatter):
    """Sized here: argparse's own sizing imports shutil, milliseconds on every command."""

    def __init__(self, prog: str, **kwargs: object) -> None:
        kwargs.setdefault("width", _help_width())
        super().__init__(prog, **kwargs)  # type: ignore[arg-type]


def _help_width() -> int:
    """As shutil.get_terminal_size: $COLUMNS, else the terminal's width, else 80; minus 2."""
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() else 0
    if width <= 0:
        try:
            width = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            width = 0
    return (width or 80) - 2


def glue_option_values(words: list[str], value_flags: dict[str, str]) -> list[str]:
    """`--timeout -inf` -> `--timeout=-inf`: an option's value is the next word, whatever it is.

    argparse would not take a value starting with '-' (`--name -x`, `--timeout -inf`)
    and would report a missing value instead of naming the bad one.
    """
    glued: list[str] = []
    rest = iter(words)
    for word in rest:
        if word == "--":
            glued += [word, *rest]
            break
        value = next(rest, None) if word in value_flags else None
        glued.append(word if value is None else f"{value_flags[word]}={value}")
    return glued


def build_parser() -> Parser:
    """The whole command line, for --help, --version and unknown commands."""
    parser = Parser(prog="tprocess", allow_abbrev=False, formatter_class=Formatter,
                    description="Keep N named Python worker processes alive under one master.")
    parser.add_argument("--version", action="version", version=f"tprocess, version {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (summary, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary, allow_abbrev=False,
                                  formatter_class=Formatter)
        add_options(name, sub)
    return parser


class Arguments:
    """Adds one command's arguments to its parser, noting the options that take a value."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.value_flags: dict[str, str] = {}  # flag -> long flag, for glue_option_values

    def value(self, *flags: str, **kwargs: object) -> None:
        self.parser.add_argument(*flags, **kwargs)  # type: ignore[arg-type]
        self.value_flags.update(dict.fromkeys(flags, flags[-1]))  # the long flag comes last

    def switch(self, *flags: str, help: str, dest: str | None = None) -> None:
        self.parser.add_argument(*flags, action="store_true", help=help, **({"dest": dest} if dest else {}))

    def positional(self, dest: str, help: str, optional: bool = False) -> None:
        self.parser.add_argument(dest, nargs="?" if optional else None, metavar=dest.upper(), help=help)

    def instance(self) -> None:
        self.value("--name", help=f"instance name (default {DEFAULT_NAME!r})")
        self.value("-c", "--config", metavar="FILE", dest="config_file",
                   help="take the name from this config file")


def add_options(command: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    """Add a command's arguments; return its options that take a value (flag -> long flag)."""
    parser.set_defaults(run=COMMANDS[command][1])
    args = Arguments(parser)
    if command == "start":
        _start_arguments(args)
        return args.value_flags
    if command in ("enqueue", "queue"):  # the queue package is imported for these two only
        from .queue import commands as queue_commands

        if command == "enqueue":
            queue_commands.add_enqueue_arguments(parser)
        else:
            queue_commands.add_queue_arguments(parser)
        return dict(queue_commands.VALUE_FLAGS)
    args.instance()
    if command == "stop":
        args.value("--timeout", type=_seconds, metavar="S",
                   help="seconds workers may take to finish (default: each group's graceful_timeout)")
    elif command == "status":
        args.switch("--json", dest="as_json", help="print JSON instead of a table")
    elif command == "top":
        args.value("--interval", type=float, default=1.0, metavar="S",
                   help="seconds between samples (default 1)")
    elif command == "logs":
        args.value("-n", "--lines", type=_integer(low=0), default=20, metavar="LINES",
                   help="how many of the last lines to print (default 20)")
        args.switch("-f", "--follow", help="then print new lines as they come, across log rotations, "
                    "until Ctrl-C")
    elif command == "scale":
        args.positional("group", "the group (may be left out if there is only one)", optional=True)
        args.positional("count", "the new number of workers, or +K / -K")
    return args.value_flags


def _start_arguments(args: Arguments) -> None:
    args.positional("task", "FILE.py:function or module:function", optional=True)
    args.value("-n", "--workers", type=_integer(), metavar="N", help="number of workers for TASK (default 1)")
    args.value("-c", "--config", metavar="FILE", dest="config_file",
               help="TOML file with the name and groups")
    args.value("--name", help=f"instance name and title prefix (default {DEFAULT_NAME!r})")
    args.switch("-d", "--daemon", help="detach; return once every worker is up")
    args.value("--log-file", metavar="FILE",
               help="log file (default for -d: ~/.local/state/tprocess/NAME.log)")
    args.value("--graceful-timeout", type=_seconds, metavar="S", help="seconds a stopping worker may take")
    args.value("--log-level", type=_log_level, default="INFO", metavar="LEVEL",
               help=f"{', '.join(LOG_LEVELS)} (default INFO)")
    args.value("--metrics", metavar="HOST:PORT", help="serve metrics over HTTP at this address")


def _integer(low: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number, at least `low`; the error names the text as given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type; the range (no NaN, no inf, no negative) is checked with the config's rules."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


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
