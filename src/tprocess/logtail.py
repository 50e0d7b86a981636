"""Reading a log file from its end, and following it across rotations (`tprocess logs`).

The tail is read backwards in chunks from the end, so a huge log costs a few
reads. Following polls (this is a client, not the master): new bytes are printed
as they come; when the file at the path is replaced (renamed away by a log
rotation, and a new one created that the master reopens on SIGUSR1), what was
left in the old file is printed first, then the new file from its start, like
`tail -F`. A file truncated in place (copytruncate) is read again from its start.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from io import FileIO

CHUNK = 65536
POLL_INTERVAL = 0.2  # seconds between looks at a quiet log


def open_log(path: str) -> FileIO:
    """Unbuffered, so that a read returns what is there now and b"" at the end."""
    return open(path, "rb", buffering=0)


def last_lines(fh: FileIO, count: int) -> bytes:
    """The last `count` lines of the file (a last line without a newline counts);
    leaves the file positioned where it ended when we looked."""
    end = fh.seek(0, os.SEEK_END)
    if count <= 0:
        return b""
    data = b""
    start = end
    while start > 0:
        start = max(0, start - CHUNK)
        fh.seek(start)
        data = fh.read(end - start - len(data)) + data
        cut = _after_last_newlines(data, count)
        if cut is not None:
            data = data[cut:]
            break
    fh.seek(end)
    return data


def _after_last_newlines(data: bytes, count: int) -> int | None:
    """Where the last `count` lines of data start, or None if data holds fewer."""
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return None
    return pos + 1


def follow(path: str, fh: FileIO, write: Callable[[bytes], object],
           interval: float = POLL_INTERVAL) -> None:
    """Write what is appended to the log at `path` until interrupted (KeyboardInterrupt)."""
    try:
        while True:
            if _copy_new_bytes(fh, write):
                continue
            renewed = _reopen_if_replaced(path, fh, write)
            if renewed is not None:
                fh.close()
                fh = renewed
                continue
            if os.fstat(fh.fileno()).st_size < fh.tell():  # truncated in place
                fh.seek(0)
                continue
            time.sleep(interval)
    finally:
        fh.close()


def _copy_new_bytes(fh: FileIO, write: Callable[[bytes], object]) -> bool:
    data = fh.read(CHUNK)
    if data:
        write(data)
    return bool(data)


def _reopen_if_replaced(path: str, fh: FileIO, write: Callable[[bytes], object]) -> FileIO | None:
    """If another file now sits at `path`: print the rest of the old one, return the new one."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return None  # renamed away, the new one not there yet: keep reading the old one
    ours = os.fstat(fh.fileno())
    if (at_path.st_ino, at_path.st_dev) == (ours.st_ino, ours.st_dev):
        return None
    try:
        renewed = open_log(path)
    except FileNotFoundError:
        return None  # replaced again in between: look again at the next turn
    while _copy_new_bytes(fh, write):
        pass
    return renewed
