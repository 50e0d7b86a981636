"""Configuration: dataclasses, the TOML loader and its validation.

Every user mistake is reported as one ConfigError line naming the file, the key
and the value, so the command line can print it without a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# the command line's fast-path checks, re-exported: `from tprocess.config import ...` keeps working
from .checks import (  # noqa: F401
    DEFAULT_NAME,
    MAX_NAME_LEN,
    MAX_TIMEOUT,
    NAME_RE,
    ConfigError,
    _show,
    check_name,
    check_seconds,
)

GROUP_RE = re.compile(r"[A-Za-z0-9_]+")
MAX_WORKERS = 4096

DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_MIN_UPTIME = 1.0
DEFAULT_MAX_FAILURES = 10
DEFAULT_BACKOFF_MAX = 30.0

TaskRef = str | Callable[..., Any]


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

    def title(self, prefix: str, index: int) -> str:
        return f"{prefix}-{self.name}-{index}" if self.name else f"{prefix}-{index}"


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
    base_dir: str = field(default_factory=os.getcwd)  # task paths are relative to it
    source: str = "command line"

    def group_timeout(self, group: GroupConfig) -> float:
        return _first(group.graceful_timeout, self.graceful_timeout)

    def group_min_uptime(self, group: GroupConfig) -> float:
        return _first(group.min_uptime, self.min_uptime)

    def group_max_failures(self, group: GroupConfig) -> int:
        return int(_first(group.max_failures, self.max_failures))

    def group_backoff_max(self, group: GroupConfig) -> float:
        return _first(group.backoff_max, self.backoff_max)

    def total_workers(self) -> int:
        return sum(g.workers for g in self.groups)


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


# --- validation -----------------------------------------------------------------

TOP_KEYS = {
    "name", "graceful_timeout", "log_file", "groups",
    "min_uptime", "max_failures", "backoff_max",
}
GROUP_KEYS = {
    "task", "workers", "setup", "teardown", "graceful_timeout",
    "min_uptime", "max_failures", "backoff_max",
}


def check_group_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not GROUP_RE.fullmatch(name) or len(name) > MAX_NAME_LEN:
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
    if config.total_workers() > MAX_WORKERS:
        raise ConfigError(f"{src}: {config.total_workers()} workers in all; at most {MAX_WORKERS}")
    return config


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
    return from_mapping(data, source=src, base_dir=os.path.dirname(os.path.abspath(src)))


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
