"""Detaching: the classic double fork, with a pipe that reports start-up back.

The command that runs `start -d` waits on the pipe and exits only when the
master says every worker is up ("ok PID") or why start-up failed ("error ...").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def ensure_std_fds() -> None:
    """Descriptors 0, 1 and 2 open (on /dev/null where the caller closed them), so that no pipe
    or socket opened later takes one of those numbers and receives log lines or a print()."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def inherited_fds() -> list[int]:
    """Descriptors above stderr that this process holds now: call it before importing
    the user's task, so that what the task opens at import is kept."""
    return [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]


def detach(run_master: Callable[[int], int], log_fd: int, close_fds: list[int] | None = None) -> str:
    """Run run_master(notify_fd) in a detached grandchild; return its start-up message.

    close_fds (what the shell passed us) are closed in the daemon, so the master and
    its workers do not hold the caller's pipes and files open for their whole life.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _become_daemon(run_master, write_fd, log_fd, close_fds or [])
    os.close(write_fd)
    os.waitpid(pid, 0)  # the intermediate child exits at once
    return _read_all(read_fd)


def _become_daemon(run_master: Callable[[int], int], notify_fd: int, log_fd: int,
                   close_fds: list[int]) -> None:
    code = 1
    try:
        os.setsid()  # no controlling terminal, out of the shell's process group
        if os.fork() != 0:
            os._exit(0)
        _redirect_stdio(log_fd)
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        code = run_master(notify_fd)
    except BaseException:  # noqa: BLE001 - report, never return into the command
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def _redirect_stdio(log_fd: int) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)


def _read_all(fd: int) -> str:
    chunks = []
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
