"""The master: an event loop that keeps every worker of every group alive.

Signal handlers only record the signal; the C-level wakeup fd wakes a selector,
and the loop dispatches to `handle_<signal>` methods. One place reaps
(`reap_children`, a WNOHANG loop, since SIGCHLDs coalesce). The loop sleeps in
the selector until a signal, a worker report, a control request or the next
timer is due: an idle master with no protection timers configured never wakes.

The worker table and each worker's life cycle are in pool.py; reloads and scaling
in roll.py; hung-task checks in guards.py; control requests in commands.py.
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
from typing import Any

import setproctitle

from . import auxiliary, control, logs, notify, output, worker
from .commands import Commands, StopReport
from .config import Config, GroupConfig
from .guards import Guards
from .logs import log
from .pool import LIVE, Group, Phase, Pool, Worker
from .roll import Roller
from .slots import BUSY, EXIT_REASON, RECYCLE_REASONS, STATE_NAMES, SlotTable
from .timers import Timer, Timers

HANDLED_SIGNALS = (
    signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
)
PR_SET_CHILD_SUBREAPER = 36
ADOPTED_GRACE = 1.0  # seconds a task's leftover child gets between SIGTERM and SIGKILL
SWEEP_DELAY = 0.2  # seconds after a worker's exit before looking for what it left
BACKOFF_BASE = 0.1


class Master:
    def __init__(self, config: Config, listener: socket.socket, notify_fd: int | None = None,
                 detached: bool = False, log_path: str | None = None) -> None:
        self.config = config  # the current generation's; top-level settings come from it
        self.generations: dict[int, Config] = {1: config}
        self.generation = 1
        self.listener = listener
        self.notify_fd = notify_fd
        self.detached = detached
        self.log_path = os.path.abspath(log_path) if log_path else None
        self.pid = os.getpid()
        self.started_at = time.monotonic()
        self.slots = SlotTable(config.name, config.total_workers())
        self.pool = Pool(self.slots)
        self.selector = selectors.DefaultSelector()
        self.output = output.OutputCapture(self.selector)  # workers' fd 1 and 2, into the log
        self.pending_signals: list[int] = []
        self.stopping = False
        self.starting = True
        self.start_error: str | None = None
        self.setup_errors: dict[str, str] = {}
        self.report = StopReport()
        self.adopted: dict[int, bool] = {}  # pid -> SIGKILL already sent
        self.sweep_timer: Timer | None = None
        self.died_in_setup: set[Worker] = set()  # during start-up: who never got through setup
        self.exit_code = 0
        # systemd's sd_notify, in the foreground only: a daemon's main pid would be the command
        self.notifier = notify.Notifier.from_environment(enabled=not detached)
        self.timers = Timers()
        # the metrics process (None: off), kept apart from the worker table
        self.aux = auxiliary.metrics_process(config, self.pid, self.slots.fd, HANDLED_SIGNALS)
        self.guards = Guards(self)
        self.roller = Roller(self)
        self.commands = Commands(self)
        self._build_table()
        self.awaiting = set(self.pool.all_workers())  # start-up ends when none is left

    # --- set-up -----------------------------------------------------------------

    def _build_table(self) -> None:
        for group in self.config.groups:
            g = self.pool.add_group(group, self.generation)
            for index in range(group.workers):
                g.members[index] = self.pool.new_worker(g, index, self.title(g.name, index))

    def title(self, group: str, index: int) -> str:
        return f"{self.config.name}-{group}-{index}" if group else f"{self.config.name}-{index}"

    def group_config(self, w: Worker | Group) -> GroupConfig:
        config = self.generations[w.generation].group(w.name if isinstance(w, Group) else w.group)
        assert config is not None
        return config

    def _open_channels(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.report_r, self.report_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.report_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        self.selector.register(self.report_r, selectors.EVENT_READ, self._on_report)
        self.control = control.Server(self.listener, self.selector, self.commands.handlers(),
                                      self.timers.call_later)

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
        fds.extend(self.commands.waiting_fds())
        if self.notify_fd is not None:
            fds.append(self.notify_fd)
        if self.notifier is not None:
            fds.append(self.notifier.fileno())
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
        log.info("starting %d workers", len(self.awaiting))
        for w in list(self.pool.all_workers()):
            self.spawn(w)
        if self.aux is not None:
            self.aux.start()
        while not self._finished():
            self._wait_for_events()
            self._dispatch_signals()
            self.timers.run_due()
            self._run_helper_timers()
        self._finish()
        return self.exit_code

    def _wait_for_events(self) -> None:
        timeout = 0 if self.pending_signals else self.timers.timeout()
        for due in self._helper_deadlines():
            until = max(0.0, due - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        for key, _ in self.selector.select(timeout):
            key.data(key.fileobj)

    def _helper_deadlines(self) -> list[float]:
        """The systemd notifier's and the metrics process's own timers, when they have one."""
        due = []
        if self.notifier is not None and (systemd_due := self.notifier.next_due()) is not None:
            due.append(systemd_due)  # only when systemd asked for a watchdog, or a stop is long
        if self.aux is not None and (aux_due := self.aux.next_due(self.stopping)) is not None:
            due.append(aux_due)
        return due

    def _run_helper_timers(self) -> None:
        now = time.monotonic()
        if self.notifier is not None:
            self.notifier.run_due(now)
        if self.aux is not None:
            self.aux.run_due(now, self.stopping)

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
        self.commands.reload(None, "SIGHUP")

    def handle_sigusr1(self) -> None:
        """Reopen the log file (logrotate's postrotate): new lines go to a new file."""
        path = self.log_path
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

    def handle_sigttin(self) -> None:
        self.commands.scale_by_signal(+1)

    def handle_sigttou(self) -> None:
        self.commands.scale_by_signal(-1)

    def _stop_or_force(self, why: str) -> None:
        if self.stopping:
            log.warning("%s again: stopping now", why)
            self.force_stop()
        else:
            self.begin_stop(why)

    # --- workers ------------------------------------------------------------------------

    def spawn(self, w: Worker) -> None:
        """Fork a process for position w (from NEW, BACKOFF or FAILED)."""
        w.cancel_timer()
        group = self.group_config(w)
        slot = self.slots[w.slot]
        spec = worker.WorkerSpec(
            title=w.title, group=w.group, index=w.index,
            task=group.task, setup=group.setup, teardown=group.teardown,  # type: ignore[arg-type]
            slot=slot, report=self.report_w, master_pid=self.pid,
            max_tasks=group.max_tasks or 0, max_memory=int(group.max_memory or 0),
            histogram=bool(getattr(self.config, "metrics", None)),
            jobs=worker.jobs_of(self.config, group), concurrency=group.concurrency or 1,  # work queues
        )
        slot.prepare_spawn()  # not the state its predecessor died in
        old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)  # no enum wrapping
        try:
            spec.output = output.Pipes.open()
            pid = os.fork()
        except OSError as exc:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
            if spec.output is not None:
                spec.output.close()
            log.error("cannot fork %s: %s; retrying in 1s", w.title, exc.strerror)
            w.move(Phase.BACKOFF)
            w.timer = self.timers.call_later(1.0, self._restart, w)
            return
        if pid == 0:
            worker.run(spec, self._master_only_fds())
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        self.output.watch(spec.output, w.title, pid)
        w.move(Phase.STARTING)
        w.pid = pid
        w.started_at = time.monotonic()
        w.ready = False
        w.ending = None
        self.pool.by_pid[pid] = w
        self.guards.on_spawn(w, group)

    def _restart(self, w: Worker) -> None:
        w.timer = None
        if not self.stopping and w.phase in (Phase.BACKOFF, Phase.FAILED):
            self.spawn(w)

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
            if self.aux is not None and self.aux.reaped(pid, status, self.stopping):
                continue
            w = self.pool.by_pid.pop(pid, None)
            if w is None:
                self.adopted.pop(pid, None)
                log.info("reaped pid %d, left behind by a task: it %s", pid, describe_status(status))
            else:
                self.on_worker_exit(w, status)
        if exited:
            # a worker's exit may leave its own children to us: look a little later,
            # off the respawn path (reading /proc competes with the new worker)
            self._schedule_sweep()

    def on_worker_exit(self, w: Worker, status: int) -> None:
        self.output.worker_exited(w.pid)  # its last lines go before its exit in the log
        uptime = time.monotonic() - w.started_at
        code = os.waitstatus_to_exitcode(status)
        reason = self._exit_reason(w, status)
        entry = {"name": w.title, "pid": w.pid, "exit": code, "group": w.group, "index": w.index}
        w.pid = 0
        w.cancel_timer()
        log.info("worker %s (pid %d) %s after %.2fs (%s)", w.title, entry["pid"],
                 describe_status(status), uptime, reason)
        if self.stopping:
            if not any(k["pid"] == entry["pid"] for k in self.report.killed):
                self.report.stopped.append(entry)
            self._end_position(w)
            return
        if w.phase is Phase.RETIRING:
            self.roller.on_retired(w, entry)
            return
        died_in_setup = not w.ready
        w.last_reason = reason
        if self.roller.on_worker_died(w, died_in_setup, self.setup_errors.get(w.group)):
            return
        self.pool.group_of(w).restarts[reason] += 1
        if self.starting and died_in_setup:
            self.died_in_setup.add(w)
            if self._start_failed(w):
                return
        self._schedule_respawn(w, reason, uptime)

    def _exit_reason(self, w: Worker, status: int) -> str:
        if w.ending:
            return w.ending
        code = os.waitstatus_to_exitcode(status)
        if code == worker.EXIT_OK:
            return RECYCLE_REASONS.get(self.slots[w.slot].word(EXIT_REASON), "exit")
        return "crash"

    def _schedule_respawn(self, w: Worker, reason: str, uptime: float) -> None:
        group = self.group_config(w)
        min_uptime = self.config.group_min_uptime(group)
        if reason in ("exit", "max_tasks", "max_memory"):
            w.failures = 0
        elif reason == "task_timeout":  # a hung task is not an early death unless it keeps coming early
            w.failures = w.failures + 1 if uptime < min_uptime else 0
        elif reason == "setup_timeout" or uptime < min_uptime:
            w.failures += 1
        else:
            w.failures = 1
        w.restarts += 1
        if w.failures >= self.config.group_max_failures(group):
            w.move(Phase.FAILED)
            self.awaiting.discard(w)
            log.error("%s failed %d times in a row within %.1fs of starting; not restarting it",
                      w.title, w.failures, min_uptime)
            self.notify_status(self.pool_summary())
            self._check_started()
            self.roller.check_done()
            return
        w.move(Phase.BACKOFF)
        delay = backoff_delay(w.failures, self.config.group_backoff_max(group))
        if delay > 0:
            log.warning("restarting %s in %.1fs (failure %d in a row)", w.title, delay, w.failures)
            w.timer = self.timers.call_later(delay, self._restart, w)
        else:
            self.spawn(w)

    def _end_position(self, w: Worker) -> None:
        if w.phase in LIVE and w.phase is not Phase.RETIRING:
            w.move(Phase.RETIRING)
        g = self.pool.group_of(w)
        for table in (g.members, g.candidates):
            if table.get(w.index) is w:
                del table[w.index]
        if w in g.retiring:
            g.retiring.remove(w)
        self.pool.forget(w)

    def retire(self, w: Worker, reason: str, timeout: float | None = None) -> None:
        """Ask a worker to finish its task and exit for good; kill it past its graceful timeout."""
        w.cancel_timer()
        if not w.alive:
            self._end_position(w)
            return
        w.move(Phase.RETIRING)
        w.ending = reason
        grace = self.config.group_timeout(self.group_config(w)) if timeout is None else timeout
        w.timer = self.timers.call_later(grace, self._kill_retiring, w, w.pid)
        _signal_child(w.pid, signal.SIGTERM)

    def _kill_retiring(self, w: Worker, pid: int) -> None:
        w.timer = None
        if w.pid == pid:
            self.kill_worker(w, "its graceful timeout passed")

    def kill_worker(self, w: Worker, why: str, reason: str | None = None) -> None:
        state = self.slots[w.slot].state
        if state == BUSY:
            log.error("killing %s (pid %d) in the middle of a task: %s", w.title, w.pid, why)
        else:
            log.warning("killing %s (pid %d, %s): %s", w.title, w.pid, STATE_NAMES[state], why)
        if reason:
            w.ending = reason
        if w.phase is Phase.RETIRING:
            self.roller.on_killed(w, STATE_NAMES[state])
        if self.stopping:
            self.report.killed.append({"name": w.title, "pid": w.pid, "state": STATE_NAMES[state]})
        _signal_child(w.pid, signal.SIGKILL)

    # --- start-up ----------------------------------------------------------------------------

    def _on_report(self, sock: socket.socket) -> None:
        while True:
            try:
                message = sock.recv(65536)
            except BlockingIOError:
                break
            kind, _, rest = message.partition(b" ")
            head, _, detail = rest.partition(b"\n")
            w = self.pool.by_pid.get(int(head))
            if w is None:
                continue
            if kind == b"R":
                self._on_ready(w)
            elif kind == b"E":
                self.setup_errors[w.group] = detail.decode(errors="replace")
        self._check_started()

    def _on_ready(self, w: Worker) -> None:
        w.ready = True
        w.ever_ready = True
        if w.phase is Phase.STARTING:
            w.move(Phase.RUNNING)
        self.awaiting.discard(w)
        self.roller.on_ready(w)

    def _check_started(self) -> None:
        if self.starting and not self.awaiting:
            self.starting = False
            running = sum(1 for w in self.pool.all_workers() if w.phase is not Phase.FAILED)
            log.info("%d of %d workers are running", running, running + sum(
                1 for w in self.pool.all_workers() if w.phase is Phase.FAILED))
            self._notify(f"ok {self.pid}")
            if not self.stopping:
                self.notify_ready(self.pool_summary())

    def _start_failed(self, w: Worker) -> bool:
        """During start-up, a group none of whose workers got through setup aborts the start."""
        g = self.pool.group_of(w)
        if not all(x in self.died_in_setup for x in g.members.values()):
            return False
        what = f"group {w.group!r}" if w.group else "the workers"
        detail = f"every worker of {what} failed during start-up"
        error = self.setup_errors.get(w.group)
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

    # --- systemd (sd_notify) --------------------------------------------------------------------

    def notify_ready(self, status: str) -> None:
        """READY=1: start-up, or a reload, is complete."""
        if self.notifier is not None:
            self.notifier.ready(status)

    def notify_reloading(self, status: str = "reloading") -> None:
        """RELOADING=1: a reload begins; notify_ready() follows when it is complete."""
        if self.notifier is not None:
            self.notifier.reloading(status)

    def notify_status(self, status: str) -> None:
        if self.notifier is not None:
            self.notifier.status(status)

    def pool_summary(self) -> str:
        """One line for `systemctl status`: how many workers run, how many failed."""
        members = [w for g in self.pool.groups.values() for w in g.members.values()]
        running = sum(1 for w in members if w.alive)
        failed = sum(1 for w in members if w.phase is Phase.FAILED)
        total = len(members)
        text = f"{running} workers running" if running == total else f"{running} of {total} workers running"
        return f"{text}, {failed} failed" if failed else text

    # --- stopping ------------------------------------------------------------------------------

    def begin_stop(self, why: str, timeout: float | None = None) -> None:
        """Ask every worker to finish its current task and exit."""
        if self.stopping:
            return
        self.stopping = True
        live = self.pool.live()
        log.info("stopping (%s): asking %d workers to finish their tasks", why, len(live))
        self.roller.abort_for_stop()
        for w in list(self.pool.all_workers()):
            if w.alive:
                if w.phase is not Phase.RETIRING:
                    self.retire(w, "stop", timeout)
                elif timeout is not None:  # a stop's own deadline also applies to those already retiring
                    w.cancel_timer()
                    w.timer = self.timers.call_later(timeout, self._kill_retiring, w, w.pid)
            else:
                self._end_position(w)
        if self.notifier is not None:
            status = f"stopping ({why}): waiting for {len(live)} workers to finish their tasks"
            self.notifier.begin_stop(self._last_kill_deadline(timeout), status)
        self.sweep_adopted()

    def _last_kill_deadline(self, timeout: float | None) -> float:
        now = time.monotonic()
        if timeout is not None:
            return now + timeout
        return now + max((self.config.group_timeout(g) for c in self.generations.values() for g in c.groups),
                         default=0.0)

    def force_stop(self) -> None:
        for w in self.pool.live():
            w.cancel_timer()
            self.kill_worker(w, "a stop-now was asked")

    def _schedule_sweep(self) -> None:
        if self.sweep_timer is None:
            self.sweep_timer = self.timers.call_later(SWEEP_DELAY, self._sweep_now)

    def _sweep_now(self) -> None:
        self.sweep_timer = None
        self.sweep_adopted()

    def sweep_adopted(self) -> None:
        """Ask what tasks left behind (adopted: we are a subreaper) to stop; kill it later."""
        aux_pid = self.aux.pid if self.aux is not None else 0
        fresh = [pid for pid in list_children(self.pid)
                 if pid not in self.pool.by_pid and pid not in self.adopted and pid != aux_pid]
        if not fresh:
            return
        log.info("stopping %d processes left behind by tasks: %s", len(fresh), fresh)
        for pid in fresh:
            self.adopted[pid] = False
            _signal_child(pid, signal.SIGTERM)
        self.timers.call_later(ADOPTED_GRACE, self._kill_adopted, fresh)

    def _kill_adopted(self, pids: list[int]) -> None:
        for pid in pids:
            if pid in self.adopted and not self.adopted[pid]:
                self.adopted[pid] = True
                _signal_child(pid, signal.SIGKILL)

    def _finished(self) -> bool:
        if not self.stopping or self.pool.by_pid:
            return False
        self.sweep_adopted()
        aux_running = self.aux is not None and self.aux.stop()  # last: metrics stay up while workers stop
        return not self.adopted and not aux_running

    def _finish(self) -> None:
        if self.report.killed:
            self.exit_code = 1
        if self.start_error:
            self.exit_code = 1
            self._notify(f"error {self.start_error}")
        else:
            self._notify("error the instance was stopped during start-up")
        self.output.close()  # every worker's last lines are in the log before stop returns
        self.commands.answer_stop_waiters()
        log.info(
            "stopped: %d workers exited, %d killed", len(self.report.stopped), len(self.report.killed)
        )


# --- small helpers ---------------------------------------------------------------------------


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
