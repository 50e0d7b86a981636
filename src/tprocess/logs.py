"""Logging: one format for every process, naming the process that wrote the line."""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# Not the standard `logging`: importing it imports `threading`, whose at-fork handler
# alone makes every forked worker copy ~90 more pages of the master (~360 KiB each,
# measured: issue 8), and its module lock is taken around every fork. The master and
# its workers need only leveled lines on one descriptor, so this is that and no more.

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_NAMES = {number: name for name, number in LEVELS.items()}

_title = "tprocess"
_tail: Ring | None = None  # the log's last bytes, shared with the output process (collector.py)
_send: Callable[[str], bool] | None = None  # the output process, while it takes the master's lines
_held: list[tuple[float, str, str]] | None = None  # (time, level, text) logged since the last release


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def timestamp(now: float | None = None) -> str:
    """The time at the head of every log line: `2026-11-29 06:15:42,050` (local time)."""
    global _second
    if now is None:
        now = time.time()
    second = int(now)
    if _second[0] != second:  # strftime once a second, not once a line
        _second = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
    return f"{_second[1]},{int(now % 1 * 1000):03d}"


def prefixed(head: str, lines: list[str]) -> str:
    """Each line with the head before it, newline-ended: a multi-line record keeps its prefix."""
    return "".join(head + line + "\n" for line in lines)


def _master_line(level: str, text: str, when: float | None = None) -> str:
    """`2026-11-29 06:15:42,050 title[pid] LEVEL text`, one prefix per line of text."""
    return prefixed(f"{timestamp(when)} {_title}[{os.getpid()}] {level} ", text.split("\n"))


class Logger:
    """The tprocess logger (`ctx.log` in a task): debug/info/warning/error/critical/exception
    with %-style arguments, like a `logging.Logger`. The master writes its lines to the log
    (and keeps the last ones for `top`); a worker frames them on its fd 2 for the master."""

    def __init__(self) -> None:
        self.level = LEVELS["INFO"]
        self.fd = 2
        self.framed = False  # in a worker: lines are records for the master to prefix

    def setLevel(self, level: int | str) -> None:  # noqa: N802 - the name logging users know
        self.level = LEVELS[level.upper()] if isinstance(level, str) else int(level)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802
        return level >= self.level

    def log(self, level: int, msg: object, *args: object, exc_info: object = False, **_: object) -> None:
        """Like logging's: exc_info True (the exception being handled), an exception or an
        (type, value, traceback) tuple adds its traceback; extra=, stack_info= are accepted."""
        if level < self.level:
            return
        try:
            text = str(msg) % args if args else str(msg)
            if exc_info:
                text += "\n" + _traceback_text(exc_info)
            self._write(_NAMES.get(level, f"Level {level}"), text)
        except Exception:  # noqa: BLE001 - a log line must never break a task or the master
            pass

    def debug(self, msg: object, *args: object, **options: object) -> None:
        self.log(10, msg, *args, **options)

    def info(self, msg: object, *args: object, **options: object) -> None:
        self.log(20, msg, *args, **options)

    def warning(self, msg: object, *args: object, **options: object) -> None:
        self.log(30, msg, *args, **options)

    def error(self, msg: object, *args: object, **options: object) -> None:
        self.log(40, msg, *args, **options)

    def critical(self, msg: object, *args: object, **options: object) -> None:
        self.log(50, msg, *args, **options)

    def exception(self, msg: object, *args: object, exc_info: object = True, **options: object) -> None:
        self.log(40, msg, *args, exc_info=exc_info, **options)

    def _write(self, level: str, text: str) -> None:
        if self.framed:
            write_fd(self.fd, prefixed(f"{RECORD_MARK}{level} ", text.split("\n")))
            return
        if _held is not None:  # the master, with an output process: formatted before it sleeps
            _held.append((time.time(), level, text))
            return
        _emit(_master_line(level, text))


RECORD_MARK = "\x1e"  # ASCII record separator: starts each line of a worker's log record
log = Logger()


def _traceback_text(exc_info: object) -> str:
    import traceback  # only when there is one to print

    if isinstance(exc_info, BaseException):
        lines = traceback.format_exception(exc_info)
    elif isinstance(exc_info, tuple):
        lines = traceback.format_exception(*exc_info)
    else:
        lines = traceback.format_exception(*sys.exc_info())
    return "".join(lines).rstrip("\n")


def write_fd(fd: int, text: str) -> None:
    """All of text on fd (a blocking descriptor); a closed one is ignored."""
    data = text.encode(errors="replace")
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # a closed terminal or pipe must not stop the master or a task
        pass


def _emit(text: str) -> None:
    """The master's lines: through the output process while it runs, else on our descriptor."""
    if _send is not None and _send(text):
        return
    if _tail is not None:
        _tail.write(text)
    write_fd(log.fd, text)


def keep_tail_in(tail: Ring) -> None:
    """Keep the log's last lines in tail (the master's, for `top`), whoever writes them."""
    global _tail
    _tail = tail


def hand_lines_to(send: Callable[[str], bool] | None) -> None:
    """Let send (the output process) write the master's lines, or None: write them here.
    While it does, the master's lines are held and formatted at release_held(), when the
    master is about to sleep: a worker's exit line is then written after its replacement
    was forked, not before (issue 8: respawn), in the same order and with the time it was logged."""
    global _send, _held
    release_held()
    _send = send
    _held = [] if send is not None else None


def release_held() -> None:
    """Format and hand on the master's lines held since the last call."""
    global _held
    if not _held:
        return
    records, _held = _held, []
    _emit("".join(_master_line(level, text, when) for when, level, text in records))


def recent_lines(count: int) -> list[str]:
    """The last lines of the log, the workers' included (none before a master keeps them)."""
    return _tail.lines(count) if _tail is not None else []


class Ring:
    """The log's last bytes, in memory shared by the master and the output process that writes
    the log (forked after it is made): a count of the bytes ever written, then the bytes."""

    SIZE = 256 * 1024

    def __init__(self) -> None:
        import mmap

        self.mem = mmap.mmap(-1, 8 + self.SIZE)  # anonymous and shared

    def write(self, text: str) -> None:
        data = text.encode(errors="replace")[-self.SIZE:]
        total = int.from_bytes(self.mem[:8], "little")
        at = total % self.SIZE
        first = min(len(data), self.SIZE - at)
        self.mem[8 + at:8 + at + first] = data[:first]
        if first < len(data):
            self.mem[8:8 + len(data) - first] = data[first:]
        self.mem[:8] = (total + len(data)).to_bytes(8, "little")

    def lines(self, count: int) -> list[str]:
        """The last count complete lines (a line being written meanwhile may come out torn)."""
        total = int.from_bytes(self.mem[:8], "little")
        if total <= self.SIZE:
            data = self.mem[8:8 + total]
        else:
            at = 8 + total % self.SIZE
            data = self.mem[at:] + self.mem[8:at]
        lines = data.decode(errors="replace").split("\n")[:-1]
        if total > self.SIZE:
            lines = lines[1:]  # the oldest line lost its beginning
        return lines[-count:] if count > 0 else []


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


def configure(level: str = "INFO", fd: int = 2) -> None:
    """Send the tprocess logger's lines to fd (stderr, which a daemon points at its log file)."""
    log.setLevel(level)
    log.fd = fd
    log.framed = False


def frame_for_master(fd: int = 2) -> None:
    """In a worker: log records go to fd 2 as framed lines the master prefixes."""
    log.fd = fd
    log.framed = True


def reopen_log_file(path: str) -> list[int]:
    """Open the log file again (after logrotate renamed it) and put the new file on every
    descriptor of this process that was the old one (in a daemon: 1, 2 and the handler's).
    Returns those descriptors; raises OSError if the file cannot be opened."""
    new = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return replace_log_fds(new)


def replace_log_fds(new: int) -> list[int]:
    """Put the file open on `new` on every descriptor of this process that is the log
    (the logger's, and stdout/stderr if they are the same file); close `new`."""
    old = _log_fds()
    try:
        for fd in old:
            os.dup2(new, fd, inheritable=fd <= 2)
    finally:
        os.close(new)
    return old


def _log_fds() -> list[int]:
    """The logger's descriptor, and stdout/stderr if they are the same file."""
    fds = [log.fd]
    files = {_identity(fd) for fd in fds} - {None}
    fds += [fd for fd in (1, 2) if fd not in fds and _identity(fd) in files]
    return sorted(set(fds))


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
