"""The `tprocess` command: start, stop, status, top.

Exit codes: 0 success; 1 a command failed at run time (start-up failed, stop had
to kill a worker mid-task); 2 a usage or configuration mistake; 3 `status` of an
instance that is not running (the LSB convention).
"""

from __future__ import annotations

import os
import select
import sys
from typing import Any

import click

from . import __version__, control, discovery
from .config import DEFAULT_NAME, Config, ConfigError, check_name, check_seconds, load_file

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 1, 2, 3
STOP_MARGIN = 30.0  # extra seconds stop waits for a master beyond the graceful timeout


class UserError(Exception):
    """One line for the user, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def main(argv: list[str] | None = None) -> None:
    try:
        code = cli.main(args=argv, prog_name="tprocess", standalone_mode=False)
    except UserError as exc:
        _fail(str(exc), exc.code)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    sys.exit(code or 0)


def _fail(message: str, code: int) -> None:
    click.echo(f"tprocess: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="tprocess")
def cli() -> None:
    """Keep N named Python worker processes alive under one master."""


# --- start -------------------------------------------------------------------------


@cli.command()
@click.argument("task", required=False)
@click.option("-n", "--workers", type=int, help="Number of workers for TASK (default 1).")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with the name and groups.")
@click.option("--name", help=f"Instance name and title prefix (default {DEFAULT_NAME!r}).")
@click.option("-d", "--daemon", is_flag=True, help="Detach; return once every worker is up.")
@click.option("--log-file", help="Log file (default for -d: ~/.local/state/tprocess/NAME.log).")
@click.option("--graceful-timeout", type=float, help="Seconds a stopping worker may take.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def start(task: str | None, workers: int | None, config_file: str | None, name: str | None,
          daemon: bool, log_file: str | None, graceful_timeout: float | None,
          log_level: str) -> int:
    """Start an instance running TASK (FILE.py:function or module:function)."""
    from .supervisor import StartError, Supervisor

    config = _start_config(task, workers, config_file)
    if name is not None:
        config.name = name
    if log_file is not None:
        config.log_file = log_file
    if graceful_timeout is not None:
        config.graceful_timeout = graceful_timeout
    sup = Supervisor(config=config)
    try:
        if not daemon:
            return sup.run(log_level.upper())
        result = sup.start_detached(log_level.upper())
    except StartError as exc:
        raise UserError(str(exc), EXIT_FAILED) from None
    click.echo(f"tprocess {config.name!r} started: master pid {result.master_pid}, "
               f"{result.workers} workers (log: {result.log_file})")
    return 0


def _start_config(task: str | None, workers: int | None, config_file: str | None) -> Config:
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


@cli.command()
@click.option("--name", help=f"Instance name (default {DEFAULT_NAME!r}).")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              help="Take the name from this config file.")
@click.option("--timeout", type=float,
              help="Seconds workers may take to finish (default: each group's graceful_timeout).")
def stop(name: str | None, config_file: str | None, timeout: float | None) -> int:
    """Stop an instance: every worker finishes its task, then all exit."""
    name = _instance_name(name, config_file)
    if timeout is not None:
        check_seconds(timeout, "--timeout")
    try:
        conn = control.connect(name)
    except control.NotRunning:
        return _stop_leftovers(name, timeout)
    with conn:
        return _stop_master(name, conn, timeout)


def _stop_master(name: str, conn: Any, timeout: float | None) -> int:
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
        click.echo(f"tprocess: error: the master (pid {master_pid}) ended without reporting "
                   "the stop; stopping what it left", err=True)
        _stop_leftovers(name, timeout)
        return EXIT_FAILED
    stopped = ", ".join(f"{w['name']} (pid {w['pid']})" for w in reply["stopped"])
    click.echo(f"stopped {name}-master (pid {master_pid}) and {len(reply['stopped'])} workers"
               + (f": {stopped}" if stopped else ""))
    for w in reply["killed"]:
        what = "cut mid-task" if w["state"] == "busy" else f"killed while {w['state']}"
        click.echo(f"{what}: {w['name']} (pid {w['pid']}) did not stop in time", err=True)
    return EXIT_FAILED if reply["killed"] else 0


def _stop_leftovers(name: str, timeout: float | None) -> int:
    leftovers = discovery.find_instance(name)
    if not leftovers:
        click.echo(f"tprocess {name!r} is not running")
        return 0
    stopped, killed = discovery.stop_processes(leftovers, 30.0 if timeout is None else timeout)
    click.echo(f"stopped {len(leftovers)} leftover processes of {name!r} whose master had died: "
               + ", ".join(ref.describe() for ref in stopped))
    for ref in killed:
        click.echo(f"killed {ref.describe()}: it did not stop in time", err=True)
    return EXIT_FAILED if killed else 0


# --- status ----------------------------------------------------------------------------


@cli.command()
@click.option("--name", help=f"Instance name (default {DEFAULT_NAME!r}).")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              help="Take the name from this config file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(name: str | None, config_file: str | None, as_json: bool) -> int:
    """Show the master and each worker; exit 0 if running, 3 if not."""
    name = _instance_name(name, config_file)
    try:
        _, reply = control.request(name, {"cmd": "status"})
    except control.NotRunning:
        return _status_not_running(name, as_json)
    except (OSError, ValueError) as exc:  # includes a time-out: the master did not answer
        raise UserError(f"the master of {name!r} did not answer: {exc or type(exc).__name__}",
                        EXIT_FAILED) from None
    _add_memory(reply)
    if as_json:
        import json

        click.echo(json.dumps(reply, indent=2))
    else:
        from .status_view import render

        render(reply)
    return 0


def _add_memory(reply: dict[str, Any]) -> None:
    """Each process's resident memory, read with psutil (only `status` imports it)."""
    import psutil

    for proc in [reply["master"], *reply["workers"]]:
        try:
            proc["rss"] = psutil.Process(proc["pid"]).memory_info().rss if proc["pid"] else None
        except psutil.Error:
            proc["rss"] = None


def _status_not_running(name: str, as_json: bool) -> int:
    leftovers = discovery.find_instance(name)
    if as_json:
        import json

        click.echo(json.dumps({"name": name, "master": None, "leftovers": [
            {"name": r.title, "pid": r.pid} for r in leftovers]}))
    else:
        click.echo(f"tprocess {name!r} is not running")
        if leftovers:
            click.echo(f"{len(leftovers)} leftover processes whose master died: "
                       + ", ".join(r.describe() for r in leftovers)
                       + "; `tprocess stop` ends them")
    return EXIT_NOT_RUNNING


# --- top -------------------------------------------------------------------------------


@cli.command()
@click.option("--name", help=f"Instance name (default {DEFAULT_NAME!r}).")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              help="Take the name from this config file.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between samples.")
def top(name: str | None, config_file: str | None, interval: float) -> int:
    """A live view of the instance; q or Ctrl-C quits."""
    from .top_view import run

    return run(_instance_name(name, config_file), interval)


def _instance_name(name: str | None, config_file: str | None) -> str:
    if name is None and config_file:
        name = load_file(config_file).name
    return check_name(DEFAULT_NAME if name is None else name, "--name")
