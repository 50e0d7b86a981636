"""Logging: one format for every process, naming the process that wrote the line."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections import deque

log = logging.getLogger("tprocess")

_title = "tprocess"
_recent: deque[str] = deque(maxlen=1000)  # the master's last lines, for `top`


class _RecentLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _recent.append(self.format(record))


def recent_lines(count: int) -> list[str]:
    """The last lines the master logged (its own, and its workers' when it carries them)."""
    return list(_recent)[-count:]


class _TitleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.title = _title
        return True


def set_title(title: str) -> None:
    """Name the current process in log lines (called after fork, with setproctitle)."""
    global _title
    _title = title


def default_log_file(name: str) -> str:
    """Where a detached instance logs unless told otherwise: the user's state folder."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "tprocess", f"{name}.log")


def open_log_file(path: str | os.PathLike[str]) -> int:
    """Open a log file for appending; raise ConfigError with a clear message."""
    from .config import ConfigError

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"log_file {path!r}: folder {folder!r} does not exist")
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise ConfigError(f"log_file {path!r}: {exc.strerror}") from None
    except ValueError as exc:  # an embedded NUL
        raise ConfigError(f"log_file {path!r}: {exc}") from None


def configure(level: str = "INFO", stream=None) -> None:
    """Send the tprocess logger to stderr (which a daemon points at its log file)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(title)s[%(process)d] %(levelname)s %(message)s")
    )
    handler.addFilter(_TitleFilter())
    recent = _RecentLines()
    recent.setFormatter(handler.formatter)
    recent.addFilter(_TitleFilter())
    log.handlers[:] = [handler, recent]
    log.setLevel(level)
    log.propagate = False


class TitledStream(io.TextIOBase):
    """A worker's sys.stdout/sys.stderr in a daemon: each printed line carries the
    same time, title[pid] and a level of OUT or ERR as the log's own lines."""

    def __init__(self, fd: int, label: str) -> None:
        self._fd = fd
        self._label = label
        self._partial = ""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if lines:
            self._emit(lines)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._emit([self._partial])
            self._partial = ""

    def _emit(self, lines: list[str]) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
        head = f"{stamp} {_title}[{os.getpid()}] {self._label} "
        os.write(self._fd, "".join(head + line + "\n" for line in lines).encode(errors="replace"))


def title_output() -> None:
    """Make what a task prints to stdout/stderr name its process (used in daemons)."""
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stdout = TitledStream(1, "OUT")
    sys.stderr = TitledStream(2, "ERR")
