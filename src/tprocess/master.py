"""The master: an event loop that keeps every worker of every group alive.

Signal handlers only record the signal; the C-level wakeup fd wakes a selector,
and the loop dispatches to `handle_<signal>` methods. One place reaps
(`reap_children`, a WNOHANG loop, since SIGCHLDs coalesce). The loop sleeps in
the selector until a signal, a worker report, a control request or the next
timer (a backoff respawn or a stop deadline) is due: an idle master never wakes.
"""

from __future__ import annotations

import _signal
import gc
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import setproctitle

from . import control, logs, output, worker
from .config import Config, ConfigError, GroupConfig, check_seconds
from .logs import log
from .slots import BUSY, STARTING, STATE_NAMES, SlotTable

HANDLED_SIGNALS = (
    signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGUSR1,
)
PR_SET_CHILD_SUBREAPER = 36
ADOPTED_GRACE = 1.0  # seconds a task's leftover child gets between SIGTERM and SIGKILL
SWEEP_DELAY = 0.2  # seconds after a worker's exit before looking for what it left
BACKOFF_BASE = 0.1


@dataclass
class Worker:
    """One entry of the worker table: a named position that a process fills."""

    group: GroupConfig
    index: int  # index within the group: the I of the title
    slot: int  # index into the shared slot table
    title: str
    pid: int = 0
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive early deaths
    failed: bool = False
    ready: bool = False
    died_before_ready: bool = False


@dataclass
class StopReport:
    stopped: list[dict[str, Any]] = field(default_factory=list)
    killed: list[dict[str, Any]] = field(default_factory=list)


class Master:
    def __init__(self, config: Config, listener: socket.socket, notify_fd: int | None = None,
                 detached: bool = False) -> None:
        self.config = config
        self.listener = listener
        self.notify_fd = notify_fd
        self.detached = detached
        self.pid = os.getpid()
        self.started_at = time.monotonic()
        self.workers: list[Worker] = []
        self.by_pid: dict[int, Worker] = {}
        self.slots = SlotTable(config.name, config.total_workers())
        self.selector = selectors.DefaultSelector()
        self.output = output.OutputCapture(self.selector)  # workers' fd 1 and 2, into the log
        self.pending_signals: list[int] = []
        self.stopping = False
        self.respawns: dict[int, float] = {}  # slot -> when to restart it (backoff)
        self.kill_at: dict[str, float] = {}  # group -> when stopping workers get SIGKILL
        self.starting = True
        self.start_error: str | None = None
        self.setup_errors: dict[str, str] = {}
        self.stop_waiters: list[socket.socket] = []
        self.report = StopReport()
        self.adopted: dict[int, float | None] = {}  # pid -> when to SIGKILL (None: sent)
        self.sweep_at: float | None = None  # when to look for what exited workers left
        self.exit_code = 0
        self._build_table()
        self.awaiting = {w.slot for w in self.workers}  # start-up ends when none is left

    # --- set-up -----------------------------------------------------------------

    def _build_table(self) -> None:
        for group in self.config.groups:
            for index in range(group.workers):
                title = group.title(self.config.name, index)
                self.workers.append(Worker(group, index, len(self.workers), title))

    def _open_channels(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.report_r, self.report_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.report_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        self.selector.register(self.report_r, selectors.EVENT_READ, self._on_report)
        self.control = control.Server(self.listener, self.selector, {
            "status": self.serve_status, "stop": self.serve_stop,
        })

    def _install_signals(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)

    def _master_only_fds(self) -> list[int]:
        """Descriptors a worker must not keep (the listener would hold the lock)."""
        fds = [self.wake_w, self.selector.fileno()]  # type: ignore[attr-defined]
        fds.extend(key.fd for key in self.selector.get_map().values())
        fds.extend(conn.fileno() for conn in self.stop_waiters)
        if self.notify_fd is not None:
            fds.append(self.notify_fd)
        return [fd for fd in fds if fd >= 0]

    # --- the loop -------------------------------------------------------------------

    def run(self) -> int:
        """Run until every worker has stopped; return the exit code."""
        setproctitle.setproctitle(f"{self.config.name}-master")
        logs.set_title(f"{self.config.name}-master")
        _become_subreaper()
        control.listen(self.listener)
        self._open_channels()
        self._install_signals()
        output.prepare_for_workers()
        gc.freeze()  # keep the master's objects out of the workers' copied pages
        log.info("starting %d workers", len(self.workers))
        for w in self.workers:
            self.spawn(w)
        while not self._finished():
            self._wait_for_events()
            self._dispatch_signals()
            self._run_due_timers()
        self._finish()
        return self.exit_code

    def _wait_for_events(self) -> None:
        for key, _ in self.selector.select(self._next_timeout()):
            key.data(key.fileobj)

    def _next_timeout(self) -> float | None:
        due = [] if self.stopping else list(self.respawns.values())
        due += self.kill_at.values()
        due += [t for t in self.adopted.values() if t is not None]
        if self.sweep_at is not None:
            due.append(self.sweep_at)
        if self.pending_signals:
            return 0
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _on_wake(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _dispatch_signals(self) -> None:
        """Handle what arrived since the last turn, SIGCHLD once: one reap covers them all,
        and workers dying during it must not keep the loop from its other duties."""
        pending, self.pending_signals = self.pending_signals, []
        reaped = False
        for signum in pending:
            if signum == signal.SIGCHLD:
                if reaped:
                    continue
                reaped = True
            handler: Callable[[], None] = getattr(self, f"handle_{signal.Signals(signum).name.lower()}")
            handler()

    # --- signals ---------------------------------------------------------------------

    def handle_sigchld(self) -> None:
        self._on_report(self.report_r)  # read what a dying worker said before its exit
        self.reap_children()

    def handle_sigterm(self) -> None:
        self._stop_or_force("SIGTERM")

    def handle_sigint(self) -> None:
        self._stop_or_force("SIGINT")

    def handle_sigusr2(self) -> None:
        self._stop_or_force("SIGUSR2")

    def handle_sigquit(self) -> None:
        self.begin_stop("SIGQUIT")
        self.force_stop()

    def handle_sighup(self) -> None:
        log.info("SIGHUP ignored (use SIGTERM, SIGINT or SIGUSR2 to stop)")

    def handle_sigusr1(self) -> None:
        """Reopen the log file (logrotate's postrotate): new lines go to a new file."""
        path = self.config.log_file
        if not path:
            log.info("SIGUSR1: no log file to reopen (logging to stderr)")
            return
        try:
            logs.reopen_log_file(os.fspath(path))
        except OSError as exc:
            log.error("SIGUSR1: cannot reopen the log file %s: %s; still writing to the old one",
                      path, exc.strerror)
            return
        log.info("reopened the log file %s", path)

    def _stop_or_force(self, why: str) -> None:
        if self.stopping:
            log.warning("%s again: stopping now", why)
            self.force_stop()
        else:
            self.begin_stop(why)

    # --- workers ------------------------------------------------------------------------

    def spawn(self, w: Worker) -> None:
        self.respawns.pop(w.slot, None)
        spec = worker.WorkerSpec(
            title=w.title, group=w.group.name, index=w.index,
            task=w.group.task, setup=w.group.setup, teardown=w.group.teardown,  # type: ignore[arg-type]
            slot=self.slots[w.slot], slot_number=w.slot, report=self.report_w,
            master_pid=self.pid, report_ready=self.starting,
        )
        self.slots[w.slot].state = STARTING  # not the state its predecessor died in
        old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)  # no enum wrapping
        try:
            spec.output = output.Pipes.open()
            pid = os.fork()
        except OSError as exc:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
            if spec.output is not None:
                spec.output.close()
            log.error("cannot fork %s: %s; retrying in 1s", w.title, exc.strerror)
            self.respawns[w.slot] = time.monotonic() + 1.0
            return
        if pid == 0:
            worker.run(spec, self._master_only_fds())
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        self.output.watch(spec.output, w.title, pid)
        w.pid = pid
        w.started_at = time.monotonic()
        self.by_pid[pid] = w

    def reap_children(self) -> None:
        """The one place that reaps: every exited child, since signals coalesce.

        Exits are collected first and handled after, so that workers which die at
        once cannot keep this loop (and the loop's other duties) going forever.
        """
        exited = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited.append((pid, status))
        for pid, status in exited:
            w = self.by_pid.pop(pid, None)
            if w is None:
                self.adopted.pop(pid, None)
                log.info("reaped pid %d, left behind by a task: it %s", pid, describe_status(status))
            else:
                self.on_worker_exit(w, status)
        if exited and self.sweep_at is None:
            # a worker's exit may leave its own children to us: look a little later,
            # off the respawn path (reading /proc competes with the new worker)
            self.sweep_at = time.monotonic() + SWEEP_DELAY

    def on_worker_exit(self, w: Worker, status: int) -> None:
        self.output.worker_exited(w.pid)  # its last lines go before its exit in the log
        uptime = time.monotonic() - w.started_at
        entry = {"name": w.title, "pid": w.pid, "exit": os.waitstatus_to_exitcode(status)}
        w.pid = 0
        log.info("worker %s (pid %d) %s after %.2fs", w.title, entry["pid"], describe_status(status), uptime)
        if self.stopping:
            if not any(k["pid"] == entry["pid"] for k in self.report.killed):
                self.report.stopped.append(entry)
            return
        w.died_before_ready = not w.ready
        if not self._start_failed(w):
            self._schedule_respawn(w, entry["exit"], uptime)

    def _schedule_respawn(self, w: Worker, code: int, uptime: float) -> None:
        if code == worker.EXIT_OK:
            w.failures = 0
        elif uptime < self.config.group_min_uptime(w.group):
            w.failures += 1
        else:
            w.failures = 1
        w.restarts += 1
        limit = self.config.group_max_failures(w.group)
        if w.failures >= limit:
            w.failed = True
            self.awaiting.discard(w.slot)
            log.error(
                "%s failed %d times in a row within %.1fs of starting; not restarting it",
                w.title, w.failures, self.config.group_min_uptime(w.group),
            )
            self._check_started()
            return
        delay = backoff_delay(w.failures, self.config.group_backoff_max(w.group))
        if delay > 0:
            log.warning("restarting %s in %.1fs (failure %d in a row)", w.title, delay, w.failures)
            self.respawns[w.slot] = time.monotonic() + delay
        else:
            self.spawn(w)

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        if not self.stopping:
            for slot, when in list(self.respawns.items()):
                if when <= now:
                    self.spawn(self.workers[slot])
        for group, when in list(self.kill_at.items()):
            if when <= now:
                del self.kill_at[group]
                for w in list(self.by_pid.values()):
                    if w.group.name == group:
                        self.kill_worker(w, "its graceful timeout passed")
        if self.sweep_at is not None and self.sweep_at <= now:
            self.sweep_at = None
            self.sweep_adopted()
        for pid, kill_at in self.adopted.items():
            if kill_at is not None and kill_at <= now:
                self.adopted[pid] = None
                _signal_child(pid, signal.SIGKILL)

    # --- start-up ----------------------------------------------------------------------------

    def _on_report(self, sock: socket.socket) -> None:
        while True:
            try:
                message = sock.recv(65536)
            except BlockingIOError:
                break
            kind, number = message[:1], message[1:].split(b"\n", 1)[0]
            w = self.workers[int(number)]
            if kind == b"R":
                w.ready = True
                self.awaiting.discard(w.slot)
            elif kind == b"E":
                self.setup_errors[w.group.name] = message.split(b"\n", 1)[1].decode(errors="replace")
        self._check_started()

    def _check_started(self) -> None:
        if self.starting and not self.awaiting:
            self.starting = False
            running = sum(1 for w in self.workers if not w.failed)
            log.info("%d of %d workers are running", running, len(self.workers))
            self._notify(f"ok {self.pid}")

    def _start_failed(self, w: Worker) -> bool:
        """During start-up, a group none of whose workers got through setup aborts the start."""
        if not self.starting:
            return False
        group = [x for x in self.workers if x.group is w.group]
        if not all(x.died_before_ready for x in group):
            return False
        what = f"group {w.group.name!r}" if w.group.name else "the workers"
        detail = f"every worker of {what} failed during start-up"
        error = self.setup_errors.get(w.group.name)
        self.start_error = f"{detail}:\n{error}" if error else f"{detail} (see the log)"
        log.error("%s; stopping", detail)
        self.begin_stop("start-up failed")
        return True

    def _notify(self, message: str) -> None:
        if self.notify_fd is None:
            return
        try:
            os.write(self.notify_fd, message.encode()[:60000])
        except OSError:
            pass
        os.close(self.notify_fd)
        self.notify_fd = None

    # --- stopping ------------------------------------------------------------------------------

    def begin_stop(self, why: str, timeout: float | None = None) -> None:
        """Ask every worker to finish its current task and exit."""
        if self.stopping:
            return
        self.stopping = True
        now = time.monotonic()
        live = [w for w in self.workers if w.pid]
        log.info("stopping (%s): asking %d workers to finish their tasks", why, len(live))
        self.respawns.clear()
        for group in self.config.groups:
            grace = self.config.group_timeout(group) if timeout is None else timeout
            self.kill_at[group.name] = now + grace
        for w in live:
            _signal_child(w.pid, signal.SIGTERM)
        self.sweep_adopted()

    def force_stop(self) -> None:
        self.kill_at.clear()
        for w in list(self.by_pid.values()):
            self.kill_worker(w, "a stop-now was asked")

    def kill_worker(self, w: Worker, why: str) -> None:
        state = self.slots[w.slot].state
        if state == BUSY:
            log.error("killing %s (pid %d) in the middle of a task: %s", w.title, w.pid, why)
        else:
            log.warning("killing %s (pid %d, %s): %s", w.title, w.pid, STATE_NAMES[state], why)
        self.report.killed.append({"name": w.title, "pid": w.pid, "state": STATE_NAMES[state]})
        _signal_child(w.pid, signal.SIGKILL)

    def sweep_adopted(self) -> None:
        """Ask what tasks left behind (adopted: we are a subreaper) to stop; kill it later."""
        adopted = [pid for pid in list_children(self.pid) if pid not in self.by_pid]
        fresh = [pid for pid in adopted if pid not in self.adopted]
        if not fresh:
            return
        log.info("stopping %d processes left behind by tasks: %s", len(fresh), fresh)
        kill_at = time.monotonic() + ADOPTED_GRACE
        for pid in fresh:
            self.adopted[pid] = kill_at
            _signal_child(pid, signal.SIGTERM)

    def _finished(self) -> bool:
        if not self.stopping or self.by_pid:
            return False
        self.sweep_adopted()
        return not self.adopted

    def _finish(self) -> None:
        if self.report.killed:
            self.exit_code = 1
        if self.start_error:
            self.exit_code = 1
            self._notify(f"error {self.start_error}")
        else:
            self._notify("error the instance was stopped during start-up")
        order = {w.title: w.slot for w in self.workers}
        self.report.stopped.sort(key=lambda e: order[e["name"]])
        reply = {"master": self.pid, "stopped": self.report.stopped, "killed": self.report.killed}
        self.output.close()  # every worker's last lines are in the log before stop returns
        for conn in self.stop_waiters:
            control.reply(conn, reply)
        log.info(
            "stopped: %d workers exited, %d killed", len(self.report.stopped), len(self.report.killed)
        )

    # --- control requests ----------------------------------------------------------------------

    def serve_status(self, conn: socket.socket, request: dict[str, Any]) -> None:
        control.reply(conn, self.status())

    def serve_stop(self, conn: socket.socket, request: dict[str, Any]) -> None:
        """Answered in _finish, once every worker is gone."""
        self.stop_waiters.append(conn)
        self.begin_stop("stop command", _timeout_of(request))

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        state = "stopping" if self.stopping else "starting" if self.starting else "running"
        return {
            "name": self.config.name,
            "master": {"pid": self.pid, "state": state, "uptime": now - self.started_at},
            "workers": [self._worker_status(w, now) for w in self.workers],
        }

    def _worker_status(self, w: Worker, now: float) -> dict[str, Any]:
        slot = self.slots[w.slot]
        if w.pid:
            state = STATE_NAMES[slot.state]
        elif w.failed:
            state = "failed"
        elif w.slot in self.respawns:
            state = "backoff"
        else:
            state = "stopped"
        return {
            "name": w.title, "group": w.group.name, "index": w.index,
            "pid": w.pid or None, "state": state,
            "uptime": now - w.started_at if w.pid else 0.0,
            "tasks": slot.tasks, "errors": slot.errors,
            "restarts": w.restarts, "failures": w.failures,
        }


# --- small helpers ---------------------------------------------------------------------------


def _timeout_of(request: dict[str, Any]) -> float | None:
    timeout = request.get("timeout")
    try:
        return None if timeout is None else check_seconds(timeout, "timeout")
    except ConfigError:
        return None


def backoff_delay(failures: int, cap: float) -> float:
    """No delay for a first failure, then 0.1s, 0.2s, 0.4s ... up to cap."""
    if failures <= 1:
        return 0.0
    return min(cap, BACKOFF_BASE * 2 ** (failures - 2))


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"was killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"was killed by signal {sig}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def list_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        import psutil

        return [p.pid for p in psutil.Process(pid).children()]


def _signal_child(pid: int, sig: int) -> None:
    """Signal our own child: safe by pid, since it cannot be reused before we reap it."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _become_subreaper() -> None:
    """Adopt what tasks leave behind, so nothing the instance started outlives it."""
    worker._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
