"""Configuration: dataclasses, the TOML loader and its validation.

Every user mistake is reported as one ConfigError line naming the file, the key
and the value, so the command line can print it without a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

# the command line's fast-path checks, re-exported: `from tprocess.config import ...` keeps working
from .checks import (  # noqa: F401
    DEFAULT_NAME,
    MAX_NAME_LEN,
    MAX_TIMEOUT,
    ConfigError,
    _show,
    check_name,
    check_seconds,
    is_name,
)

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import Any

# patterns compiled on first use (re caches them), not at every start: ~0.4 ms of `start`
GROUP_PATTERN = r"[A-Za-z0-9_]+"
MAX_WORKERS = 4096  # the hard ceiling; max_workers (default 1024) is the working one
DEFAULT_MAX_WORKERS = 1024
MIN_MEMORY = 1 << 20

DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_MIN_UPTIME = 1.0
DEFAULT_MAX_FAILURES = 10
DEFAULT_BACKOFF_MAX = 30.0
DEFAULT_RELOAD_BATCH = 1
# work queues (a group with `queue`)
DEFAULT_JOB_TIMEOUT = 300.0  # a job unacknowledged this long is delivered again
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_DELAY = 1.0  # seconds before the first retry; doubles per attempt (capped)
MAX_RETRIES_LIMIT = 1000
MAX_CONCURRENCY = 10_000
SIZE_PATTERN = r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|[KMGT]|B)?\s*"
SIZE_UNITS = {
    "": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}

TaskRef = str | Callable[..., object]


@dataclass
class GroupConfig:
    """One group of identical workers. An empty name gives titles PREFIX-I."""

    name: str
    task: TaskRef
    workers: int = 1
    setup: TaskRef | None = None
    teardown: TaskRef | None = None
    graceful_timeout: float | None = None
    min_uptime: float | None = None
    max_failures: int | None = None
    backoff_max: float | None = None
    task_timeout: float | None = None  # a task running longer is hung: SIGKILL and replace
    setup_timeout: float | None = None  # a worker still in setup after this long is killed
    max_tasks: int | None = None  # recycle a worker after this many tasks
    max_memory: int | str | None = None  # recycle a worker whose RSS grew past this (bytes or "512MiB")
    reload_batch: int | None = None  # workers replaced at a time by a rolling reload
    queue: str | None = None  # the task runs once per job of this queue: task(ctx, job)
    job_timeout: float | None = None  # a job unacknowledged this long is delivered again
    max_retries: int | None = None  # retries of a failing job before it is dead-lettered
    retry_delay: float | None = None  # seconds before the first retry, doubling
    concurrency: int | None = None  # async tasks: jobs in flight (or loops) per worker
    refs: dict[str, TaskRef] = field(default_factory=dict, repr=False)  # as written, before import


def worker_title(prefix: str, group: str, index: int) -> str:
    """PREFIX-GROUP-I, or PREFIX-I for the unnamed group of `start TASK -n N`."""
    return f"{prefix}-{group}-{index}" if group else f"{prefix}-{index}"


@dataclass
class Config:
    """A whole instance: its name (the title prefix) and its groups."""

    name: str = DEFAULT_NAME
    groups: list[GroupConfig] = field(default_factory=list)
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    min_uptime: float = DEFAULT_MIN_UPTIME
    max_failures: int = DEFAULT_MAX_FAILURES
    backoff_max: float = DEFAULT_BACKOFF_MAX
    log_file: str | None = None
    max_workers: int = DEFAULT_MAX_WORKERS
    reload_batch: int = DEFAULT_RELOAD_BATCH
    metrics: str | int | None = None  # "HOST:PORT" the metrics process serves; None: off
    broker: str | None = None  # the queues' broker URL; None: the instance's default SQLite file
    base_dir: str = field(default_factory=os.getcwd)  # task paths are relative to it
    source: str = "command line"
    path: str | None = None  # the config file's absolute path: what a reload reads again
    overrides: dict[str, Any] = field(default_factory=dict)  # command-line options, kept over a reload

    def group_timeout(self, group: GroupConfig) -> float:
        return _first(group.graceful_timeout, self.graceful_timeout)

    def group_min_uptime(self, group: GroupConfig) -> float:
        return _first(group.min_uptime, self.min_uptime)

    def group_max_failures(self, group: GroupConfig) -> int:
        return int(_first(group.max_failures, self.max_failures))

    def group_backoff_max(self, group: GroupConfig) -> float:
        return _first(group.backoff_max, self.backoff_max)

    def group_reload_batch(self, group: GroupConfig) -> int:
        return int(_first(group.reload_batch, self.reload_batch))

    def queue_groups(self) -> list[GroupConfig]:
        return [g for g in self.groups if g.queue]

    def broker_url(self) -> str:
        """The broker every queue group uses: `broker`, or the instance's default SQLite file."""
        if self.broker is not None:
            return self.broker
        from .queue.urls import default_broker_url

        return default_broker_url(self.name)

    def total_workers(self) -> int:
        return sum(g.workers for g in self.groups)

    def worker_limit(self) -> int:
        """The most workers scale and reload may reach: max_workers, or more if started with more."""
        return max(self.max_workers, self.total_workers())

    def group(self, name: str) -> GroupConfig | None:
        return next((g for g in self.groups if g.name == name), None)


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


# --- validation -----------------------------------------------------------------

TOP_KEYS = {
    "name", "graceful_timeout", "log_file", "groups",
    "min_uptime", "max_failures", "backoff_max", "max_workers", "reload_batch", "metrics",
    "broker",
}
GROUP_KEYS = {
    "task", "workers", "setup", "teardown", "graceful_timeout",
    "min_uptime", "max_failures", "backoff_max",
    "task_timeout", "setup_timeout", "max_tasks", "max_memory", "reload_batch",
    "queue", "job_timeout", "max_retries", "retry_delay", "concurrency",
}
JOB_KEYS = ("job_timeout", "max_retries", "retry_delay")  # meaningful only with a queue


def check_group_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(GROUP_PATTERN, name) or len(name) > MAX_NAME_LEN:
        raise ConfigError(
            f"{where}: group name {_show(name)} is not valid; use letters, digits and '_' "
            f"(at most {MAX_NAME_LEN})"
        )
    return name


def check_workers(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"{where}: expected 1 to {MAX_WORKERS} workers, got {value}")
    return value


def check_count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ConfigError(f"{where}: expected a whole number from 1 to 1000000, got {_show(value)}")
    return value


def check_size(value: Any, where: str) -> int:
    """A memory size: a number of bytes, or a string like "512MiB", "2GiB", "300MB"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{where}: expected a size like \"512MiB\" or a number of bytes, "
                          f"got {_show(value)}")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(SIZE_PATTERN, value, re.IGNORECASE)
        if not match:
            raise ConfigError(f"{where}: {_show(value)} is not a size; use a number of bytes or units "
                              "B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB)")
        size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").lower()])
    if not MIN_MEMORY <= size <= 1 << 50:
        raise ConfigError(f"{where}: expected 1MiB to 1PiB, got {_show(value)}")
    return size


def check_ref(value: Any, where: str) -> TaskRef:
    if callable(value):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"[^:\s]+:[A-Za-z_][\w.]*", value):
        raise ConfigError(
            f"{where}: expected 'FILE.py:function' or 'module:function', got {_show(value)}"
        )
    return value


def validate(config: Config) -> Config:
    """Check a Config built from any source; raise ConfigError on the first mistake."""
    src = config.source
    check_name(config.name, f"{src}: name")
    check_seconds(config.graceful_timeout, f"{src}: graceful_timeout")
    check_seconds(config.min_uptime, f"{src}: min_uptime")
    check_count(config.max_failures, f"{src}: max_failures")
    check_seconds(config.backoff_max, f"{src}: backoff_max", allow_zero=False)
    if config.log_file is not None and (
        not isinstance(config.log_file, str | os.PathLike) or "\0" in os.fspath(config.log_file)
    ):
        raise ConfigError(f"{src}: log_file: expected a path, got {_show(config.log_file)}")
    if config.metrics is not None:
        from .listen import parse_address  # it imports this module

        parse_address(config.metrics, f"{src}: metrics")
    if config.broker is not None:
        from .queue.urls import parse_broker_url  # it imports this module

        try:
            config.broker = parse_broker_url(config.broker, config.base_dir).url
        except ConfigError as exc:
            raise ConfigError(f"{src}: {exc}") from None
    if not config.groups:
        raise ConfigError(f"{src}: no groups: give a task, or at least one [groups.NAME] table")
    seen: set[str] = set()
    for group in config.groups:
        where = f"{src}: groups.{group.name}" if group.name else src
        if group.name:
            check_group_name(group.name, where)
        if group.name in seen:
            raise ConfigError(f"{where}: group {group.name!r} is declared twice")
        seen.add(group.name)
        check_ref(group.task, f"{where}: task")
        check_workers(group.workers, f"{where}: workers")
        for key in ("setup", "teardown"):
            if getattr(group, key) is not None:
                check_ref(getattr(group, key), f"{where}: {key}")
        for key in ("graceful_timeout", "min_uptime"):
            if getattr(group, key) is not None:
                check_seconds(getattr(group, key), f"{where}: {key}")
        if group.backoff_max is not None:
            check_seconds(group.backoff_max, f"{where}: backoff_max", allow_zero=False)
        if group.max_failures is not None:
            check_count(group.max_failures, f"{where}: max_failures")
        _check_guards(group, where)
        _check_queue_keys(group, where)
    check_worker_limit(config.max_workers, f"{src}: max_workers")
    check_count(config.reload_batch, f"{src}: reload_batch")
    if config.total_workers() > MAX_WORKERS:
        raise ConfigError(f"{src}: {config.total_workers()} workers in all; at most {MAX_WORKERS}")
    return config


def check_worker_limit(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"{where}: expected a whole number from 1 to {MAX_WORKERS}, got {_show(value)}")
    return value


def _check_guards(group: GroupConfig, where: str) -> None:
    """The optional per-group protections against hung and leaking workers."""
    for key in ("task_timeout", "setup_timeout"):
        if getattr(group, key) is not None:
            check_seconds(getattr(group, key), f"{where}: {key}", allow_zero=False)
    for key in ("max_tasks", "reload_batch"):
        if getattr(group, key) is not None:
            check_count(getattr(group, key), f"{where}: {key}")
    if group.max_memory is not None:
        group.max_memory = check_size(group.max_memory, f"{where}: max_memory")


def _check_queue_keys(group: GroupConfig, where: str) -> None:
    """`queue` and the job options; the job options need a queue."""
    if group.queue is not None:
        from .queue.jobs import check_queue_name  # it imports this module

        try:
            check_queue_name(group.queue)
        except ConfigError as exc:
            raise ConfigError(f"{where}: queue: {exc}") from None
    else:
        for key in JOB_KEYS:
            if getattr(group, key) is not None:
                raise ConfigError(f"{where}: {key}: only for a group with a queue (set `queue`)")
    if group.job_timeout is not None:
        check_seconds(group.job_timeout, f"{where}: job_timeout", allow_zero=False)
    if group.retry_delay is not None:
        check_seconds(group.retry_delay, f"{where}: retry_delay")
    if group.max_retries is not None:
        value = group.max_retries
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES_LIMIT:
            raise ConfigError(f"{where}: max_retries: expected a whole number from 0 to "
                              f"{MAX_RETRIES_LIMIT}, got {_show(value)}")
    if group.concurrency is not None:
        value = group.concurrency
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
            raise ConfigError(f"{where}: concurrency: expected a whole number from 1 to "
                              f"{MAX_CONCURRENCY}, got {_show(value)}")


# --- TOML -----------------------------------------------------------------------


def load_file(path: str | os.PathLike[str]) -> Config:
    """Read and validate a tprocess TOML file."""
    import tomllib

    src = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{src}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{src}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{src}: permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{src}: not valid UTF-8 ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: invalid TOML: {exc}") from None
    config = from_mapping(data, source=src, base_dir=os.path.dirname(os.path.abspath(src)))
    config.path = os.path.abspath(src)
    return config


def from_mapping(data: dict[str, Any], source: str, base_dir: str | os.PathLike[str]) -> Config:
    """Build a validated Config from parsed TOML."""
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(TOP_KEYS))}"
        )
    groups_table = data.get("groups", {})
    if not isinstance(groups_table, dict):
        raise ConfigError(f"{source}: groups: expected a table of [groups.NAME], got {_show(groups_table)}")
    config = Config(source=source, base_dir=os.fspath(base_dir))
    for key in TOP_KEYS - {"groups"}:
        if key in data:
            setattr(config, key, data[key])
    for gname, table in groups_table.items():
        check_group_name(gname, f"{source}: groups")
        where = f"{source}: groups.{gname}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {_show(table)}")
        unknown = sorted(set(table) - GROUP_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(GROUP_KEYS))}"
            )
        if "task" not in table:
            raise ConfigError(f"{where}: missing key 'task'")
        config.groups.append(GroupConfig(name=gname, **table))
    return validate(config)
