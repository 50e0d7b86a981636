"""Finding an instance's processes through /proc, without pid files.

A process counts as part of instance NAME only if all of these hold: it belongs
to the calling user, its command line is a title of the instance (`NAME-master`,
`NAME-metrics`, `NAME-output`, `NAME-I`, `NAME-GROUP-I`), and it holds the instance's marker memfd (see
slots.marker_name). A stranger titled `tprocess-3` has no marker; a reused pid
fails the start-time check. Signals go through a pidfd opened before the final
check, so the check and the signal cannot race with pid reuse.
"""

from __future__ import annotations

import os
import re
import select
import time
from collections import namedtuple


def marker_name(uid: int, name: str) -> str:
    """The name of the memfd (the slot table) that every process of an instance holds."""
    return f"tprocess:{uid}:{name}"


class ProcessRef(namedtuple("ProcessRef", "pid start_ticks title")):
    """A process proven to be ours, identified by pid and kernel start time.

    A named tuple, not a dataclass: `stop` and `status` import this module, and
    dataclasses (through inspect) would cost them milliseconds.
    """

    __slots__ = ()
    pid: int
    start_ticks: int
    title: str

    def describe(self) -> str:
        return f"{self.title} (pid {self.pid})"


def title_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name) + r"-(?:master|metrics|output|(?:[A-Za-z0-9_]+-)?\d+)")


def find_instance(name: str) -> list[ProcessRef]:
    """Every live process of instance `name` owned by the calling user.

    Reads /proc directly rather than through psutil: this runs on every `start`,
    and the scan is a few lines where psutil's import alone costs tens of ms.
    """
    uid = os.getuid()
    pattern = title_pattern(name)
    marker = f"/memfd:{marker_name(uid, name)} (deleted)"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        title = _title(pid)
        # the owner is checked only for the few processes titled like the instance
        if title is None or not pattern.fullmatch(title) or not _owned_by(pid, uid):
            continue
        ref = _prove(pid, title, marker)
        if ref is not None:
            found.append(ref)
    return found


def _title(pid: int) -> str | None:
    """The command line of a process as ps shows it; None if it is gone or unreadable."""
    try:  # os.read, not open(): this runs for every process on every `start`, `stop` and `status`
        fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = [os.read(fd, 4096)]
        while chunks[-1]:
            chunks.append(os.read(fd, 4096))
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).replace(b"\0", b" ").decode(errors="replace").strip()


def _owned_by(pid: int, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def _prove(pid: int, title: str, marker: str) -> ProcessRef | None:
    ticks = start_ticks(pid)
    if ticks is None or not holds_marker(pid, marker):
        return None
    return ProcessRef(pid, ticks, title)


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from its field 3 (the state) on: fields[0] is field 3 of proc(5),
    fields[19] the start time (22). None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()  # the title may hold spaces and parentheses


def start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (/proc/PID/stat field 22)."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == b"Z":
        return None
    return int(fields[19])


def holds_marker(pid: int, marker: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == marker:
                return True
        except OSError:
            continue
    return False


def still_same(ref: ProcessRef) -> bool:
    return start_ticks(ref.pid) == ref.start_ticks


def open_pidfd(ref: ProcessRef) -> int | None:
    """A pidfd for ref, or None if the process is gone or its pid now names another."""
    try:
        fd = os.pidfd_open(ref.pid)
    except OSError:
        return None
    if not still_same(ref):  # checked after opening: the pidfd cannot be recycled
        os.close(fd)
        return None
    return fd


def send_signal(ref: ProcessRef, sig: int) -> bool:
    """Signal a proven process; False if it is gone."""
    fd = open_pidfd(ref)
    if fd is None:
        return False
    try:
        import signal  # here: `stop`/`status` that find nothing never need it

        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def wait_gone(refs: list[ProcessRef], timeout: float) -> list[ProcessRef]:
    """Wait until every process has exited (pidfds turn readable); return those left."""
    pidfds = {}
    for ref in refs:
        fd = open_pidfd(ref)
        if fd is not None:
            pidfds[fd] = ref
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while pidfds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                os.close(fd)
                pidfds.pop(fd)
        return list(pidfds.values())
    finally:
        for fd in pidfds:
            os.close(fd)


def stop_processes(refs: list[ProcessRef], timeout: float) -> tuple[list[ProcessRef], list[ProcessRef]]:
    """SIGTERM, wait up to timeout, SIGKILL the rest. Returns (stopped, killed)."""
    import signal

    for ref in refs:
        send_signal(ref, signal.SIGTERM)
    left = wait_gone(refs, timeout)
    for ref in left:
        send_signal(ref, signal.SIGKILL)
    wait_gone(left, 5.0)
    killed = set(left)
    return [r for r in refs if r not in killed], left
