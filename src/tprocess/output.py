"""Workers' output: everything a worker writes to fd 1 or 2 reaches the log with its name.

Before each fork the master makes two pipes; the child puts their write ends on its
fd 1 and 2, so a print(), a C library writing to fd 2 and a program the task execs
all write into them. The output process (collector.py) reads the other ends in its
event loop and writes each line to the log as `TIME TITLE[PID] OUT|ERR text`, in the
log's own format. It is the log's only writer, so lines never interleave mid-line, and
each pipe keeps its own partial line, so one worker's half line is never glued to another's.

The worker's own log records (ctx.log, tracebacks of failing tasks) go to fd 2 too,
framed: each line starts with RECORD_MARK and the record's level, and it is written
with that level instead of ERR (so nothing is prefixed twice, and every line of a
traceback carries the full prefix).

Fairness: a readable pipe gets one read of at most READ_SIZE per turn of the loop,
so a worker flooding its output cannot starve the others (nor the master's own lines,
read first); when the reader falls behind, the pipe fills and the flooding worker blocks
in its write (back-pressure on the writer, never on the master).
"""

from __future__ import annotations

import errno
import os
import resource
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import logs
from .logs import LEVELS, RECORD_MARK

READ_SIZE = 65536  # at most this much per pipe per turn of the loop
MAX_LINE = 16384  # a longer line is written in pieces of this size
DRAIN_READS = 64  # reads per pipe when a worker has exited (bounded: a grandchild may flood)
FDS_PER_WORKER = 2  # what the output process holds per worker (the read ends)
FD_MARGIN = 192  # besides the read ends: selector, sockets, log ... and a spawn batch's other ends

_original_nofile: int | None = None  # the soft limit before raise_fd_limit, restored in workers


@dataclass
class Pipes:
    """The two pipes of one worker: (read, write) for its fd 1 and for its fd 2."""

    out_r: int
    out_w: int
    err_r: int
    err_w: int

    @classmethod
    def open(cls) -> Pipes:
        """Made before fork; O_CLOEXEC so no program exec'd anywhere keeps the master's ends."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            close_fds([out_r, out_w])
            raise
        return cls(out_r, out_w, err_r, err_w)

    def close(self) -> None:
        close_fds([self.out_r, self.out_w, self.err_r, self.err_w])

    def fd_runs(self) -> list[tuple[int, int]]:
        """The four descriptors as runs [fd, fd + 1), for a child to close."""
        return [(fd, fd + 1) for fd in (self.out_r, self.out_w, self.err_r, self.err_w)]


# --- the worker's side ---------------------------------------------------------------------


def prepare_for_workers() -> None:
    """In the master, once before any fork: what each worker would otherwise redo."""
    if sys.stdout is not None:
        try:  # a pipe is block-buffered by default: make print() lines arrive promptly
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            pass


def become_writer(pipes: Pipes) -> None:
    """In the child right after fork: fd 1 and 2 are the pipes; log records are framed."""
    os.dup2(pipes.out_w, 1)
    os.dup2(pipes.err_w, 2)
    pipes.close()
    logs.frame_for_master()


def restore_fd_limit() -> None:
    """In the child, once the master's descriptors are closed: the open-file limit the
    instance was started with (tasks and what they exec see the usual environment)."""
    if _original_nofile is None:
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (_original_nofile, hard))
    except (OSError, ValueError):
        pass


def silence() -> None:
    """The master is gone and nobody reads the pipes: send fd 1 and 2 to /dev/null,
    so that a print in the task being finished does not raise BrokenPipeError."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


# --- the reading side (the output process) -------------------------------------------------------


class _Stream:
    """One pipe the master reads: a worker's fd 1 (OUT) or fd 2 (ERR), and its partial line."""

    __slots__ = ("fd", "title", "pid", "label", "partial")

    def __init__(self, fd: int, title: str, pid: int, label: str) -> None:
        self.fd = fd
        self.title = title
        self.pid = pid
        self.label = label
        self.partial = b""

    def lines(self, data: bytes) -> list[str]:
        """Complete lines of partial + data; keeps the rest. Long lines come in pieces."""
        data = self.partial + data
        end = data.rfind(b"\n")
        if end < 0:
            self.partial = data
            return self._cut_partial()
        self.partial = data[end + 1:]
        lines = data[:end].decode(errors="replace").split("\n")
        if any(len(line) > MAX_LINE for line in lines):
            lines = [piece for line in lines for piece in _pieces(line)]
        return lines + self._cut_partial()

    def _cut_partial(self) -> list[str]:
        if len(self.partial) < MAX_LINE:
            return []
        cut = len(self.partial) - len(self.partial) % MAX_LINE
        head, self.partial = self.partial[:cut], self.partial[cut:]
        return _pieces(head.decode(errors="replace"))

    def rest(self) -> list[str]:
        """The partial line at the end of the stream."""
        data, self.partial = self.partial, b""
        return [data.decode(errors="replace")] if data else []


class OutputCapture:
    """The reader of every worker's pipes, on the output process's epoll. It holds the only
    copy of each read end, so closing one also takes it out of the epoll set."""

    def __init__(self, poller: select.epoll, write: Callable[[str], None]) -> None:
        self.poller = poller
        self.write = write
        self.streams: dict[int, _Stream] = {}  # read fd -> stream
        self.by_pid: dict[int, tuple[_Stream, _Stream]] = {}  # live worker -> its streams

    def watch(self, out_r: int, err_r: int, title: str, pid: int) -> None:
        """Read a new worker's pipes (the read ends of its fd 1 and 2)."""
        out, err = _Stream(out_r, title, pid, "OUT"), _Stream(err_r, title, pid, "ERR")
        for stream in (out, err):
            os.set_blocking(stream.fd, False)
            self.streams[stream.fd] = stream
            self.poller.register(stream.fd, select.EPOLLIN)
        self.by_pid[pid] = (out, err)

    def on_readable(self, fd: int) -> None:
        stream = self.streams.get(fd)
        if stream is not None:  # else closed earlier in this turn of the loop
            self._read(stream, 1)

    def _read(self, stream: _Stream, reads: int) -> bool:
        """Read up to `reads` times; write the complete lines; True once the pipe is closed."""
        lines: list[str] = []
        closed = False
        for _ in range(reads):
            try:
                data = os.read(stream.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                data = b""
            if not data:
                lines += stream.rest()
                closed = True
                break
            lines += stream.lines(data)
        if lines:
            self.write(_format(stream, lines))
        if closed:
            self._forget(stream)
        return closed

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.fd, None)
        close_fds([stream.fd])  # out of the epoll set too: no other copy of it is open

    def worker_exited(self, pid: int) -> None:
        """Write what an exited worker left in its pipes, before its exit is logged.
        Pipes still held by processes the task started stay open, under its name."""
        for stream in self.by_pid.pop(pid, ()):
            if self.streams.get(stream.fd) is stream:  # not closed (its number may be reused)
                self._read(stream, DRAIN_READS)

    def close(self) -> None:
        """At the end: write what is left in every pipe, partial lines included, and close."""
        for stream in list(self.streams.values()):
            if not self._read(stream, DRAIN_READS):
                rest = stream.rest()
                if rest:
                    self.write(_format(stream, rest))
                self._forget(stream)
        self.by_pid.clear()


def _format(stream: _Stream, lines: list[str]) -> str:
    """Lines in the log's own format: `2026-11-29 06:49:18,123 TITLE[PID] LEVEL text`."""
    who = f"{logs.timestamp()} {stream.title}[{stream.pid}] "
    head = f"{who}{stream.label} "
    if stream.label == "OUT":
        return logs.prefixed(head, lines)
    return "".join(_err_line(who, head, line) for line in lines)


def _err_line(who: str, head: str, line: str) -> str:
    if line.startswith(RECORD_MARK):
        level, sep, text = line[1:].partition(" ")
        if sep and level in LEVELS:
            return f"{who}{level} {text}\n"
    return head + line + "\n"


def _pieces(line: str) -> list[str]:
    return [line[i:i + MAX_LINE] for i in range(0, len(line), MAX_LINE)] or [""]


# --- descriptors ------------------------------------------------------------------------------------


def fds_needed(workers: int) -> int:
    return workers * FDS_PER_WORKER + FD_MARGIN + len(os.listdir("/proc/self/fd"))


def raise_fd_limit(workers: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard one (two pipes per worker); return
    why the limit is too low for this many workers, or None if it is enough."""
    global _original_nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = fds_needed(workers)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            _original_nofile = soft
            soft = hard
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (f"{workers} workers need about {needed} open files (two pipes each), "
                f"but the limit (ulimit -n) is {soft}: raise it or run fewer workers")
    return None


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
