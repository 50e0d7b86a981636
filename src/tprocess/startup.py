"""Start-up: the instance is up once every worker has run its `setup`.

Workers report "R PID" on a pipe once through setup (it holds thousands of reports:
none waits for the master), and "E PID" and the traceback on a datagram socket when
setup raised. Start-up ends when every worker is ready or failed for
good; a group none of whose workers got through setup aborts the start. A detached
start learns the outcome through a pipe ("ok PID" or "error ..."), systemd through
READY=1. Ready reports after start-up feed reloads and scale-ups (roll.py).
"""

from __future__ import annotations

import os

from .logs import log
from .pool import Phase, Worker

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    import _socket

    from .master import Master


class Startup:
    def __init__(self, master: Master, notify_fd: int | None) -> None:
        self.m = master
        self.notify_fd = notify_fd  # a detached start's pipe back to the command
        self.done = False
        self.awaiting: set[Worker] = set()
        self.setup_errors: dict[str, str] = {}  # group -> the last setup traceback
        self.error: str | None = None
        self._died: set[Worker] = set()  # never got through setup
        self._partial = b""  # the ready pipe's incomplete last line

    def on_report(self, sock: _socket.socket) -> None:
        while True:
            try:
                message = sock.recv(65536)
            except BlockingIOError:
                break
            kind, _, rest = message.partition(b" ")
            head, _, detail = rest.partition(b"\n")
            w = self.m.pool.by_pid.get(int(head))
            if w is None:
                continue
            if kind == b"E":  # a setup's traceback: too long for the ready pipe's atomic writes
                self.setup_errors[w.group] = detail.decode(errors="replace")
        self.check()

    def on_ready_pipe(self, fd: int) -> None:
        """Read the ready pipe: "R PID\n" per worker through setup (writes under PIPE_BUF
        are whole, but a read may stop anywhere: the rest waits in `_partial`)."""
        data = self._partial
        try:
            while chunk := os.read(fd, 65536):
                data += chunk
        except BlockingIOError:
            pass
        lines = data.split(b"\n")
        self._partial = lines.pop()
        by_pid = self.m.pool.by_pid
        for line in lines:
            w = by_pid.get(int(line[2:]))
            if w is not None:
                self._on_ready(w)
        self.check()

    def _on_ready(self, w: Worker) -> None:
        w.ready = True
        w.ever_ready = True
        if w.phase is Phase.STARTING:
            w.move(Phase.RUNNING)
        self.awaiting.discard(w)
        self.m.roller.on_ready(w)

    def gave_up(self, w: Worker) -> None:
        """w is marked failed: start-up no longer waits for it."""
        self.awaiting.discard(w)
        self.check()

    def check(self) -> None:
        m = self.m
        if self.done or self.awaiting:
            return
        self.done = True
        if self.error is not None:  # a group failed in setup: the stop's end (finish) says so
            return
        failed = sum(1 for w in m.pool.all_workers() if w.phase is Phase.FAILED)
        total = sum(1 for _ in m.pool.all_workers())
        log.info("%d of %d workers are running", total - failed, total)
        self.answer(f"ok {m.pid}")
        if not m.stopping:
            m.notifier.ready(m.pool.summary())
        m.control.load_codec()  # now, not in the first `stop` or `status`, nor in the first workers

    def died_in_setup(self, w: Worker) -> bool:
        """During start-up: True if a whole group has now failed in setup (the start is over)."""
        self._died.add(w)
        g = self.m.pool.group_of(w)
        if not all(x in self._died for x in g.members.values()):
            return False
        what = f"group {w.group!r}" if w.group else "the workers"
        detail = f"every worker of {what} failed during start-up"
        error = self.setup_errors.get(w.group)
        self.error = f"{detail}:\n{error}" if error else f"{detail} (see the log)"
        log.error("%s; stopping", detail)
        self.m.begin_stop("start-up failed")
        return True

    def answer(self, message: str) -> None:
        """Tell a detached start how start-up ended (once)."""
        if self.notify_fd is None:
            return
        try:
            os.write(self.notify_fd, message.encode()[:60000])
        except OSError:
            pass
        os.close(self.notify_fd)
        self.notify_fd = None

    def finish(self) -> None:
        """The master stops: a start still waiting hears why."""
        if self.error:
            self.answer(f"error {self.error}")
        else:
            self.answer("error the instance was stopped during start-up")
