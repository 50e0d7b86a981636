"""Workers' output is read in a process of its own, NAME-output: the master holds no pipe.

Why (issue 8): the master used to hold the read ends of every worker's two output pipes.
Every fork copied them and every new worker closed them again, so at 2,000 workers a
respawn copied and closed 4,000 descriptors (9.6-12.6 ms, against 3.4-4.6 ms for the same
master without them) and a start of 2,000 did so 2,000 times.

How: the master still makes a worker's pipes before its fork (output.Pipes); right after
the fork it sends their read ends here (SCM_RIGHTS on a SOCK_SEQPACKET socket) and closes
all four. This process reads them with output.OutputCapture, as the master did, and
writes the lines to the log. The master queues what it sends (records: a length, a kind,
a body; the descriptors of a message go to its W records in order) and sends it in one
message before its loop sleeps, or after a batch of forks: a stop of 2,000 workers is a
few dozen messages, not 4,000.

It is the log's only writer while it runs: the master sends its own lines down the same
socket, in order, so no two processes interleave in the log, and "drain pid" goes before
the master's line about a worker's exit, so that worker's last lines come first. When it
is not running (before the first fork, at the end of a stop, between its death and its
restart) the master writes its lines itself. The last lines of the log, the workers'
included, are kept in a ring shared with the master, for `top`.

It is forked from the master (no exec: it needs nothing the master does not have), with
the master's signals blocked, and it ignores the signals an operator or a terminal sends
to the whole instance. It ends when the master asks, at the end of a stop, after draining
every pipe; or, if the master dies, once its workers are gone. If it dies, the master
starts another and has the workers it read replaced at their next task boundary (restart
reason `output`): nothing reads their pipes any more.
"""

from __future__ import annotations

import _signal
import _socket  # not socket.py (its enums: ~0.2 MiB in the master and every worker)
import os
import select
import selectors
import sys
import time
from collections import deque
from collections.abc import Sequence

from . import logs, output, proctitle
from .logs import log

MESSAGE_MAX = 65536  # bytes of one message on the socket
RECORD_MAX = 16384  # log text goes in records of at most this many bytes
FDS_MAX = 250  # descriptors in one message (the kernel takes up to 253)
FD_SIZE = 4  # bytes of a descriptor (a C int) in SCM_RIGHTS data
MESSAGES_PER_TURN = 64  # the master's messages handled before the pipes get their turn
OUTBOX_MAX = 10_000  # messages waiting for a stalled output process; past it, lines are dropped
STOP_GRACE = 5.0  # seconds the output process gets to drain every pipe at the end of a stop
ORPHAN_CHECK = 1.0  # seconds between looks for live workers once the master is gone

WATCH, DRAIN, LINES, REOPEN, FINISH = b"W", b"X", b"L", b"R", b"F"


class OutputProcess:
    """The master's side: starts the process, queues and sends it pipes and lines, knows its pid."""

    def __init__(self, title: str, keep_fd: int, blocked: Sequence[int],
                 selector: selectors.BaseSelector) -> None:
        self.title = title
        self.keep_fd = keep_fd  # the instance's marker: discovery proves the process by it
        self.blocked = tuple(blocked)
        self.selector = selector
        self.pid = 0
        self.sock: _socket.socket | None = None
        self.pending = bytearray()  # records not sent yet
        self.pending_fds: list[int] = []  # their descriptors, in order
        self.outbox: deque[tuple[bytes, list[int]]] = deque()  # messages waiting for room
        self.holding = False  # to be forked after the first workers: see hold
        self.dropped = 0
        self.finishing = False
        self.kill_at: float | None = None
        self.ring = logs.Ring()
        logs.keep_tail_in(self.ring)  # from now on `top` reads the log's tail there

    @property
    def running(self) -> bool:
        return self.sock is not None

    @property
    def accepting(self) -> bool:
        """Workers forked now get output pipes: it runs, or it will be started after them."""
        return self.sock is not None or self.holding

    def hold(self) -> None:
        """The first batch of workers is forked before this process: it then shares the
        master's pages as they are after those forks, instead of keeping its own copy of every
        page the master writes meanwhile (~0.2 MiB at N = 5: issue 8). Their pipes wait for it
        (a full pipe makes a worker wait in its write, nothing is lost). Only one batch: every
        descriptor held is copied and closed by each fork meanwhile, and the socket to this
        process would get a number above them all, which every later fork would copy a table
        up to (measured holding a whole start of 2,000: start +34 %, respawn there +46 %)."""
        self.holding = True

    def held_fds(self) -> list[int]:
        """The read ends queued for the process and not sent yet, which every worker forked
        meanwhile must close: before it runs, one spawn batch's; while it runs, those of the
        messages waiting for room in its socket (a stalled process stops reading)."""
        return self.pending_fds + [fd for _, fds in self.outbox for fd in fds]

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def start(self) -> bool:
        """Fork the process; until it runs the master writes its own lines. What was held for
        it is sent now; if it cannot be forked, the held pipes are closed."""
        self.flush()  # what is queued joins what is held, in order
        held, self.holding = self.holding, False
        master_end, own_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, self.blocked)
        try:
            pid = os.fork()
        except OSError as exc:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
            master_end.close()
            own_end.close()
            self._clear_outbox()
            log.error("cannot fork %s: %s; workers started meanwhile write to the master's log "
                      "unprefixed", self.title, exc.strerror)
            return False
        if pid == 0:
            _become_output_process(self.title, own_end, self.keep_fd, self.blocked, self.ring)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        own_end.close()
        master_end.setblocking(False)
        self.sock, self.pid, self.finishing, self.kill_at = master_end, pid, False, None
        logs.hand_lines_to(self.send_lines)
        log.info("started %s (pid %d)", self.title, pid)
        if held and self.outbox:
            self._flush_outbox(master_end)
            if self.outbox:  # the rest when the socket has room
                self.selector.register(master_end, selectors.EVENT_WRITE, self._flush_outbox)
        return True

    # --- what the master sends ----------------------------------------------------------

    def watch(self, pipes: output.Pipes, title: str, pid: int) -> None:
        """Right after a fork: the read ends go to the output process; the master keeps none."""
        output.close_fds([pipes.out_w, pipes.err_w])
        self._queue(WATCH, b"%d %s" % (pid, title.encode()), [pipes.out_r, pipes.err_r])

    def worker_exited(self, pid: int) -> None:
        """Before the master's line about the exit: the worker's last lines."""
        self._queue(DRAIN, b"%d" % pid)

    def send_lines(self, text: str) -> bool:
        """The master's log lines, in order with the rest; False: write them yourself."""
        if self.sock is None or self.finishing:
            return False
        data = text.encode(errors="replace")
        for at in range(0, len(data), RECORD_MAX):
            self._queue(LINES, data[at:at + RECORD_MAX])
        return True

    def reopen(self, fd: int) -> None:
        """After SIGUSR1: the master's new log descriptor, for the output process to write to."""
        if self.sock is not None:
            logs.release_held()  # the lines logged before the reopen go to the old file
            self._queue(REOPEN, b"", [os.dup(fd)])

    def _queue(self, kind: bytes, body: bytes, fds: list[int] | None = None) -> None:
        fds = fds or []
        if self.sock is None and not self.holding:
            output.close_fds(fds)
            return
        if len(self.pending) + 5 + len(body) > MESSAGE_MAX or len(self.pending_fds) + len(fds) > FDS_MAX:
            self.flush()
        self.pending += (len(body) + 1).to_bytes(4, "little") + kind + body
        self.pending_fds += fds

    def flush(self) -> None:
        """Send what was queued, the master's held lines last, in one message (the master's
        loop calls this before it sleeps)."""
        logs.release_held()
        if not self.pending:
            return
        data, fds = bytes(self.pending), self.pending_fds
        self.pending, self.pending_fds = bytearray(), []
        self._send(data, fds)

    def _send(self, data: bytes, fds: list[int]) -> None:
        """Send one message, or keep it behind those waiting; its descriptors are closed here."""
        if self.sock is None:
            if self.holding:  # until it is forked: kept, in order
                self.outbox.append((data, fds))
            else:
                output.close_fds(fds)
            return
        if not self.outbox:
            try:
                self._send_now(data, fds)
                return
            except BlockingIOError:
                pass
            except OSError:  # it died: its exit is reaped soon, and the master writes its lines
                output.close_fds(fds)
                return
        if not fds and len(self.outbox) >= OUTBOX_MAX:
            self.dropped += 1
            return
        if not self.outbox:
            self.selector.register(self.sock, selectors.EVENT_WRITE, self._flush_outbox)
        self.outbox.append((data, fds))

    def _send_now(self, data: bytes, fds: list[int]) -> None:
        assert self.sock is not None
        if fds:
            send_fds(self.sock, data, fds)
            output.close_fds(fds)
        else:
            self.sock.send(data)

    def _flush_outbox(self, sock: _socket.socket) -> None:
        """The socket has room again: send what waits, oldest first."""
        while self.outbox:
            data, fds = self.outbox[0]
            try:
                self._send_now(data, fds)
            except BlockingIOError:
                return
            except OSError:
                break
            self.outbox.popleft()
        self._clear_outbox()
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            log.warning("%d messages of the master's log lines were dropped: %s fell behind",
                        dropped, self.title)

    def _clear_outbox(self) -> None:
        for _, fds in self.outbox:
            output.close_fds(fds)
        self.outbox.clear()
        if self.sock is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass

    # --- its end ----------------------------------------------------------------------------

    def reaped(self, pid: int, status: int) -> bool:
        """Handle the exit if pid is this process's; False if it is not."""
        if not pid or pid != self.pid:
            return False
        from .lifecycle import describe_status  # lifecycle imports the master's modules

        expected = self.finishing
        self._forget()
        if expected:
            log.info("%s (pid %d) %s", self.title, pid, describe_status(status))
        else:
            log.error("%s (pid %d) %s: starting another", self.title, pid, describe_status(status))
        return True

    def _forget(self) -> None:
        output.close_fds(self.pending_fds)
        self.pending, self.pending_fds = bytearray(), []
        self._clear_outbox()
        if self.sock is not None:
            self.sock.close()
        self.sock, self.pid, self.kill_at = None, 0, None
        logs.hand_lines_to(None)  # lines held until now: the master writes them

    def stop(self) -> bool:
        """At the end of a stop, once the workers are gone: ask it to drain every pipe and
        exit; from then on the master writes its own lines. True while it still runs."""
        if not self.pid:
            return False
        if not self.finishing:
            logs.release_held()  # the master's lines so far go before the finish
            self._queue(FINISH, b"")
            self.flush()
            self.finishing = True  # after the message: the lines before it go through it
            self.kill_at = time.monotonic() + STOP_GRACE
            logs.hand_lines_to(None)
        return True

    def next_due(self) -> float | None:
        return self.kill_at

    def run_due(self, now: float) -> None:
        if self.kill_at is not None and self.kill_at <= now and self.pid:
            self.kill_at = None
            log.warning("killing %s (pid %d): it did not finish %.0fs after the stop",
                        self.title, self.pid, STOP_GRACE)
            from .lifecycle import signal_child

            signal_child(self.pid, _signal.SIGKILL)


def send_fds(sock: _socket.socket, data: bytes, fds: list[int]) -> None:
    """One message carrying descriptors (SCM_RIGHTS), as socket.send_fds sends it."""
    rights = b"".join(fd.to_bytes(FD_SIZE, sys.byteorder) for fd in fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


def receive_fds(sock: _socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries, as socket.recv_fds reads them."""
    data, ancillary, _, _ = sock.recvmsg(size, _socket.CMSG_LEN(max_fds * FD_SIZE))
    fds = []
    for level, kind, rights in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(rights[at:at + FD_SIZE], sys.byteorder)
                    for at in range(0, len(rights) - FD_SIZE + 1, FD_SIZE)]
    return data, fds


# --- the output process -------------------------------------------------------------------------


def _become_output_process(title: str, sock: _socket.socket, keep_fd: int, blocked: Sequence[int],
                           ring: logs.Ring) -> None:
    """In the child: the master's descriptors closed, its signals ignored; never returns."""
    code = 1
    try:
        for sig in blocked:  # still blocked: no handler of the master runs
            _signal.signal(sig, _signal.SIG_IGN)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        _signal.set_wakeup_fd(-1)  # the master's wake pipe is not ours to write
        _close_all_but({sock.fileno(), keep_fd, logs.log.fd})
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
        proctitle.setproctitle(title)
        logs.set_title(title)
        logs.hand_lines_to(None)
        _Server(sock, ring).run()
        code = 0
    except BaseException:  # noqa: BLE001 - never return into the master's code
        log.exception("%s failed", title)
    finally:
        os._exit(code)


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(fd for fd in keep if fd >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class _Server:
    """The output process's loop: the master's messages first, then one read per pipe."""

    def __init__(self, sock: _socket.socket, ring: logs.Ring) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.ring = ring
        self.poller = select.epoll()
        self.poller.register(sock.fileno(), select.EPOLLIN)
        self.capture = output.OutputCapture(self.poller, self.write)
        self.master_gone = False
        self.finish = False

    def write(self, text: str) -> None:
        self.ring.write(text)
        logs.write_fd(logs.log.fd, text)

    def run(self) -> None:
        sock_fd = self.sock.fileno()
        while not self.finish:
            events = self.poller.poll(ORPHAN_CHECK if self.master_gone else -1)
            if not self.master_gone and any(fd == sock_fd for fd, _ in events):
                self._on_messages()
            for fd, _ in events:
                if fd != sock_fd:
                    self.capture.on_readable(fd)
            if self.master_gone and not self._workers_left():
                break
        self.capture.close()

    def _on_messages(self) -> None:
        for _ in range(MESSAGES_PER_TURN):
            try:
                data, fds = receive_fds(self.sock, MESSAGE_MAX, FDS_MAX)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:  # the master is gone: serve its workers' pipes until they are too
                output.close_fds(fds)
                self.master_gone = True
                self.poller.unregister(self.sock.fileno())
                return
            self._handle(data, fds)
            if self.finish:
                return

    def _handle(self, data: bytes, fds: list[int]) -> None:
        """Each record of one message, in order; W records take the message's descriptors."""
        given = iter(fds)
        at = 0
        while at + 5 <= len(data):
            end = at + 4 + int.from_bytes(data[at:at + 4], "little")
            kind, body = data[at + 4:at + 5], data[at + 5:end]
            at = end
            if kind == LINES:
                self.write(body.decode(errors="replace"))
            elif kind == DRAIN:
                self.capture.worker_exited(int(body))
            elif kind == WATCH:
                pid, _, title = body.partition(b" ")
                self.capture.watch(next(given), next(given), title.decode(errors="replace"), int(pid))
            elif kind == REOPEN:
                logs.replace_log_fds(next(given))
            elif kind == FINISH:
                self.finish = True
        output.close_fds(list(given))  # none, unless a message was garbled

    def _workers_left(self) -> bool:
        """Once the master is gone: pipes still open and a worker still alive."""
        if not self.capture.streams:
            return False
        for pid in self.capture.by_pid:
            try:
                os.kill(pid, 0)
                return True
            except (ProcessLookupError, PermissionError):  # gone, or a reused pid of someone else's
                continue
        return False
