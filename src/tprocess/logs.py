"""Logging: one format for every process, naming the process that wrote the line."""

from __future__ import annotations

import logging
import os
import sys
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


def write_raw(text: str) -> None:
    """Write lines already in the log's format (workers' output) where the log goes."""
    _recent.extend(text.splitlines())  # `top` shows the workers' lines too
    for handler in log.handlers:
        stream = getattr(handler, "stream", None)
        if stream is None:
            continue
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed terminal or pipe must not stop the master
            pass


def reopen_log_file(path: str) -> list[int]:
    """Open the log file again (after logrotate renamed it) and put the new file on every
    descriptor of this process that was the old one (in a daemon: 1, 2 and the handler's).
    Returns those descriptors; raises OSError if the file cannot be opened."""
    old = _log_fds()
    for handler in log.handlers:
        handler.flush()
    new = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        for fd in old:
            os.dup2(new, fd, inheritable=fd <= 2)
    finally:
        os.close(new)
    return old


def _log_fds() -> list[int]:
    """The handler's descriptor, and stdout/stderr if they are the same file."""
    fds = []
    for handler in log.handlers:
        try:
            fds.append(handler.stream.fileno())  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            continue
    files = {_identity(fd) for fd in fds} - {None}
    fds += [fd for fd in (1, 2) if fd not in fds and _identity(fd) in files]
    return sorted(set(fds))


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
