"""The client side of `tprocess logs`, `reload` and `scale`.

reload and scale send one request over the control channel and wait, without a
time limit, for the master's answer: a rolling reload takes as long as its
workers' graceful stops. An {"error", "code"} answer becomes one error line and
that exit code.
"""

from __future__ import annotations

import re
import sys

from . import control
from .cli import EXIT_FAILED, EXIT_USAGE, UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

COUNT_RE = re.compile(r"[0-9]+|[+-][0-9]*[1-9][0-9]*")  # N >= 0, or +K / -K with K >= 1


# --- reload and scale ----------------------------------------------------------------


def parse_count(text: str) -> str:
    """Check a scale COUNT (N, +K or -K) and return it as given; a usage error otherwise."""
    if not COUNT_RE.fullmatch(text):
        raise UserError(f"COUNT: expected a number of workers (0 or more), or +K / -K with K >= 1, "
                        f"got {text!r}", EXIT_USAGE)
    return text


def reload_command(name: str) -> int:
    reply = ask(name, {"cmd": "reload"})
    replaced = reply.get("replaced") or []
    print(f"reloaded {name}: generation {reply.get('generation', '-')}, {len(replaced)} workers replaced"
          + _started_stopped_counts(reply))
    for worker in replaced:
        print(f"{worker.get('name', '-')} (pid {worker.get('old_pid', '-')} -> {worker.get('new_pid', '-')})")
    _print_started_stopped(reply)
    return 0


def scale_command(name: str, group: str | None, count: str) -> int:
    reply = ask(name, {"cmd": "scale", "group": group, "count": count})
    group_name = reply.get("group", group)
    in_group = f" group {group_name}" if group_name else ""
    print(f"scaled {name}{in_group}: {reply.get('before', '-')} -> {reply.get('workers', '-')} workers")
    _print_started_stopped(reply)
    return 0


def _started_stopped_counts(reply: dict[str, Any]) -> str:
    started, stopped = reply.get("started") or [], reply.get("stopped") or []
    return (f", {len(started)} started" if started else "") + (f", {len(stopped)} stopped" if stopped else "")


def _print_started_stopped(reply: dict[str, Any]) -> None:
    for verb in ("started", "stopped"):
        for worker in reply.get(verb) or []:
            print(f"{verb} {worker.get('name', '-')} (pid {worker.get('pid', '-')})")


def ask(name: str, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request and wait as long as the master takes; raise UserError on any failure."""
    try:
        sock = control.connect(name)
    except control.NotRunning:
        raise UserError(f"tprocess {name!r} is not running", EXIT_FAILED) from None
    except OSError as exc:
        raise UserError(f"cannot reach the master of {name!r}: {exc.strerror or exc}", EXIT_FAILED) from None
    with sock:
        try:
            control.send(sock, message)
            sock.settimeout(None)  # a rolling reload lasts as long as the workers' graceful stops
            reply = control.receive(sock)
        except (OSError, ValueError) as exc:
            raise UserError(f"the master of {name!r} did not answer: {exc or type(exc).__name__}",
                            EXIT_FAILED) from None
    if not isinstance(reply, dict):
        raise UserError(f"the master of {name!r} answered {str(reply)[:80]!r}", EXIT_FAILED)
    if "error" in reply:
        code = reply.get("code") if reply.get("code") in (1, 2) else EXIT_FAILED
        message = str(reply["error"])  # a run-time failure may carry a worker's traceback: keep its lines
        raise UserError(message.replace("\n", "\\n") if code == 2 else message.rstrip(), code)
    return reply


# --- logs ------------------------------------------------------------------------------


def logs_command(name: str, config_file: str | None, lines: int, follow: bool) -> int:
    from . import logtail

    path = log_file_of(name, config_file)
    try:
        fh = logtail.open_log(path)
    except FileNotFoundError:
        raise UserError(f"no log file for {name!r} (looked at {path})", EXIT_FAILED) from None
    except OSError as exc:
        raise UserError(f"cannot read the log file of {name!r}: {path}: {exc.strerror}",
                        EXIT_FAILED) from None
    try:
        _write(logtail.last_lines(fh, lines))
        if follow:
            logtail.follow(path, fh, _write)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one ends `logs -f`
    finally:
        fh.close()
    return 0


def log_file_of(name: str, config_file: str | None) -> str:
    """The running master's log file if it says; else the config file's; else the default path."""
    reported = _reported_log_file(name)
    if reported is not None:
        return reported
    if config_file:
        from .config import load_file

        configured = load_file(config_file).log_file
        if configured:
            return str(configured)
    from .logs import default_log_file

    return default_log_file(name)


def _reported_log_file(name: str) -> str | None:
    """The log file named in the running master's status; None if it is not running or does not say."""
    try:
        _, reply = control.request(name, {"cmd": "status"})
    except (control.NotRunning, OSError, ValueError):
        return None
    if "log_file" not in reply:
        return None  # a master from before status reported its log file
    if reply["log_file"] is None:
        raise UserError(f"tprocess {name!r} logs to stderr (it runs in the foreground without --log-file): "
                        "its log is wherever that output goes", EXIT_FAILED)
    return str(reply["log_file"])


def _write(data: bytes) -> None:
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
