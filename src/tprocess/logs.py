"""Logging: one format for every process, naming the process that wrote the line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("tprocess")

_title = "tprocess"


class _TitleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.title = _title
        return True


def set_title(title: str) -> None:
    """Name the current process in log lines (called after fork, with setproctitle)."""
    global _title
    _title = title


def default_log_file(name: str) -> Path:
    """Where a detached instance logs unless told otherwise: the user's state folder."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "tprocess" / f"{name}.log"


def open_log_file(path: str | os.PathLike[str]) -> int:
    """Open a log file for appending; raise ConfigError with a clear message."""
    from .config import ConfigError

    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"log_file {str(path)!r}: folder {str(path.parent)!r} does not exist")
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise ConfigError(f"log_file {str(path)!r}: {exc.strerror}") from None


def configure(level: str = "INFO", stream=None) -> None:
    """Send the tprocess logger to stderr (which a daemon points at its log file)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(title)s[%(process)d] %(levelname)s %(message)s")
    )
    handler.addFilter(_TitleFilter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
