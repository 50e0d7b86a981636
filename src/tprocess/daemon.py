"""Detaching: the classic double fork, with a pipe that reports start-up back.

The command that runs `start -d` waits on the pipe and exits only when the
master says every worker is up ("ok PID") or why start-up failed ("error ...").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def detach(run_master: Callable[[int], int], log_fd: int) -> str:
    """Run run_master(notify_fd) in a detached grandchild; return its start-up message."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _become_daemon(run_master, write_fd, log_fd)
    os.close(write_fd)
    os.waitpid(pid, 0)  # the intermediate child exits at once
    return _read_all(read_fd)


def _become_daemon(run_master: Callable[[int], int], notify_fd: int, log_fd: int) -> None:
    code = 1
    try:
        os.setsid()  # no controlling terminal, out of the shell's process group
        if os.fork() != 0:
            os._exit(0)
        _redirect_stdio(log_fd)
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
