"""The Python API, shared by the command line: validate, lock, clean up, run.

    from tprocess import Supervisor

    sup = Supervisor("crawler", graceful_timeout=10)
    sup.add_group("ip", task=scan_ip, workers=5, setup=open_db, teardown=close_db)
    sup.run()            # foreground; returns the exit code once stopped
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from . import control, daemon, discovery, listen, logs, output
from .config import Config, ConfigError, GroupConfig, TaskRef, validate
from .loader import resolve_config

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import Any


class StartError(Exception):
    """Start-up failed for a reason that is not a configuration mistake."""


@dataclass
class StartResult:
    """What a detached start reports back: the master, its workers, its log."""

    master_pid: int
    workers: int
    log_file: str | None
    cleaned: list[discovery.ProcessRef]


class Supervisor:
    """A tprocess instance built in Python: groups of workers under one master."""

    def __init__(self, name: str = "tprocess", *, graceful_timeout: float = 30.0,
                 log_file: str | None = None, config: Config | None = None, **options: Any) -> None:
        self.config = config or Config(
            name=name, graceful_timeout=graceful_timeout, log_file=log_file, **options
        )

    def add_group(self, name: str, task: TaskRef, workers: int = 1, *,
                  setup: TaskRef | None = None, teardown: TaskRef | None = None,
                  **options: Any) -> Supervisor:
        """Add a group; an empty name gives workers titled NAME-I instead of NAME-GROUP-I."""
        self.config.groups.append(
            GroupConfig(name=name, task=task, workers=workers, setup=setup, teardown=teardown, **options)
        )
        return self

    def prepare(self) -> None:
        """Validate and import every task: raises ConfigError before anything runs."""
        validate(self.config)
        if self.config.metrics is not None:
            listen.check_installed()
        resolve_config(self.config)
        if self.config.queue_groups():
            check_broker(self.config)
        too_low = output.raise_fd_limit(self.config.total_workers())
        if too_low:
            raise StartError(too_low)

    def run(self, log_level: str = "INFO") -> int:
        """Run in the foreground until stopped; return the master's exit code."""
        daemon.ensure_std_fds()
        self.prepare()
        log_fd = logs.open_log_file(self.config.log_file) if self.config.log_file else None
        logs.configure(log_level, log_fd if log_fd is not None else 2)
        listener = self._take_lock()
        self._clean_leftovers()
        self._check_metrics_address(listener)
        from .master import Master

        return Master(self.config, listener, log_path=self.config.log_file).run()

    def start_detached(self, log_level: str = "INFO") -> StartResult:
        """Start as a daemon; return once every worker is up, or raise StartError."""
        daemon.ensure_std_fds()
        inherited = daemon.inherited_fds()
        self.prepare()
        log_path = str(self.config.log_file or logs.default_log_file(self.config.name))
        if not self.config.log_file:
            try:
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"log_file {log_path!r} (the default): {exc.strerror}; "
                                  "give --log-file") from None
        log_fd = logs.open_log_file(log_path)
        listener = self._take_lock()
        cleaned = self._clean_leftovers()
        self._check_metrics_address(listener)
        # imported here, not in the daemon: imports right after a fork copy every page they
        # write (18 ms there against 10 ms here), and the workers are forked after them
        from .master import Master

        def run_master(notify_fd: int) -> int:
            logs.configure(log_level)
            return Master(self.config, listener, notify_fd, detached=True, log_path=log_path).run()

        message = daemon.detach(run_master, log_fd, inherited)
        listener.close()
        os.close(log_fd)
        kind, _, detail = message.partition(" ")
        if kind == "ok":
            return StartResult(int(detail), self.config.total_workers(), log_path, cleaned)
        if kind == "error":
            raise StartError(f"{detail} (log: {log_path})")
        raise StartError(f"the master exited during start-up; see the log {log_path}")

    def _take_lock(self) -> Any:
        try:
            return control.bind(self.config.name)
        except control.AlreadyRunning as exc:
            pid = f" (master pid {exc.pid})" if exc.pid else ""
            raise StartError(f"tprocess {self.config.name!r} is already running{pid}") from None

    def _check_metrics_address(self, listener: Any) -> None:
        """Before anything forks, with the lock held and leftovers gone (one of them may have
        held the port): the metrics address must be free, else one error and no instance."""
        if self.config.metrics is None:
            return
        try:
            listen.check_can_listen(*listen.parse_address(self.config.metrics, "metrics"))
        except ConfigError:
            listener.close()  # the lock: a later start must not find it taken
            raise

    def _clean_leftovers(self) -> list[discovery.ProcessRef]:
        """Stop processes of this instance whose master died (we hold the lock now)."""
        leftovers = discovery.find_instance(self.config.name)
        if not leftovers:
            return []
        names = ", ".join(ref.describe() for ref in leftovers)
        print(f"tprocess: stopping {len(leftovers)} leftover processes of "
              f"{self.config.name!r} whose master died: {names}", file=sys.stderr)
        _, killed = discovery.stop_processes(leftovers, self.config.graceful_timeout)
        for ref in killed:
            print(f"tprocess: killed {ref.describe()} after {self.config.graceful_timeout:g}s",
                  file=sys.stderr)
        return leftovers


def check_broker(config: Config) -> None:
    """Open the queues' broker and make it answer, then close it: before anything is forked, a
    malformed or unreachable broker is one error line (ConfigError: usage, StartError: run time)."""
    from .queue.jobs import BrokerError
    from .queue.urls import open_broker

    url = config.broker_url()
    if config.broker is None:  # the default file: its folder is ours to create
        folder = os.path.dirname(url.removeprefix("sqlite://"))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise StartError(f"broker {url}: state folder {folder!r}: {exc.strerror}") from None
    try:
        broker = open_broker(url, retry_for=0)
    except ImportError as exc:
        raise ConfigError(f"{config.source}: broker {url!r}: needs the {exc.name or 'redis'} package: "
                          "pip install 'tprocess[redis]'") from None
    try:
        broker.check()
    except BrokerError as exc:
        raise StartError(f"broker unreachable: {exc}") from None
    finally:
        broker.close()


def one_task_config(name: str, task: TaskRef, workers: int, **options: Any) -> Config:
    """The config of `tprocess start TASK -n N`: one unnamed group."""
    config = Config(name=name, **options)
    config.groups.append(GroupConfig(name="", task=task, workers=workers))
    return config

