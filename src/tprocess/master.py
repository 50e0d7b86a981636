"""The master: an event loop that keeps every worker of every group alive.

Signal handlers only record the signal; the C-level wakeup fd wakes a selector,
and the loop dispatches to `handle_<signal>` methods. One place reaps
(`reap_children`, a WNOHANG loop, since SIGCHLDs coalesce). The loop sleeps in
the selector until a signal, a worker report, a control request or the next
timer is due: an idle master with no protection timers configured never wakes.

What happens around the loop lives beside it: the worker table and each worker's
life cycle (pool.py, lifecycle.py), start-up (startup.py), reloads and scaling
(roll.py), hung-task checks (guards.py), control requests (commands.py), what tasks
leave behind (leftovers.py), workers' output (output.py, read in a process of its own:
collector.py), systemd (notify.py).
"""

from __future__ import annotations

import _signal
import _socket  # not socket.py: its enums are ~0.2 MiB that every worker would inherit
import gc
import os
import selectors
import signal
import time
from collections.abc import Callable

from . import auxiliary, collector, control, libc, logs, notify, output, proctitle, worker
from .config import Config, GroupConfig, worker_title
from .fdranges import TrackedSelector, merged, ranges_with
from .guards import Guards
from .leftovers import Leftovers
from .lifecycle import Lifecycle, signal_child
from .logs import log
from .pool import Group, Phase, Pool, Worker
from .slots import SlotTable
from .startup import Startup
from .timers import Timers

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import Any

    from .commands import Commands, StopReport
    from .roll import Roller

HANDLED_SIGNALS = (
    signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGQUIT, signal.SIGHUP,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
)
SPAWN_BATCH = 32  # workers forked back to back (their pipes are open at once: 4 descriptors each)
INTERNAL_ERROR_LIMIT, INTERNAL_ERROR_WINDOW = 20, 10.0  # internal errors in that many seconds: stop


def _reap_one() -> tuple[int, int] | None:
    """(pid, wait status) of one exited child, or None if none is left to reap now."""
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return None
    return (pid, status) if pid else None


class Master:
    def __init__(self, config: Config, listener: _socket.socket, notify_fd: int | None = None,
                 detached: bool = False, log_path: str | None = None) -> None:
        self.config = config  # the current generation's; top-level settings come from it
        self.generations: dict[int, Config] = {1: config}
        self.generation = 1  # what new workers run
        self.newest_generation = 1
        self.listener = listener
        self.log_path = os.path.abspath(log_path) if log_path else None
        self.pid = os.getpid()
        self.started_at = time.monotonic()
        self.slots = SlotTable(config.name, config.total_workers())
        self.pool = Pool(self.slots)
        self.selector = TrackedSelector()  # keeps its descriptors as runs, for closing in workers
        # workers' fd 1 and 2 are read, and the log written, by a process of its own
        self.output = collector.OutputProcess(f"{config.name}-output", self.slots.fd, HANDLED_SIGNALS,
                                              self.selector)
        self.pending_signals: list[int] = []
        self.first_exit_of_turn = False  # its replacement runs before the master goes on: _spawn_batch
        self.stopping = False
        self.exit_code = 0
        self.internal_errors: list[float] = []
        # systemd's sd_notify, in the foreground only: a daemon's main pid would be the command
        self.notifier = notify.Notifier.from_environment(enabled=not detached) or notify.NullNotifier()
        self.timers = Timers()
        # the metrics process (None: off), kept apart from the worker table
        self.aux = auxiliary.metrics_process(config, self.pid, self.slots.fd, HANDLED_SIGNALS)
        self.life = Lifecycle(self)
        self.startup = Startup(self, notify_fd)
        self.leftovers = Leftovers(self)
        self.guards = Guards(self)
        # requests (stop, status, reload, scale) are served once the first workers are forked:
        # see _add_operations
        self.commands: Commands | None = None
        self.roller: Roller
        self.stop_report: StopReport
        self._build_table()
        self.startup.awaiting = set(self.pool.all_workers())  # start-up ends when none is left

    @property
    def starting(self) -> bool:
        return not self.startup.done

    # --- set-up -----------------------------------------------------------------

    def _build_table(self) -> None:
        for group in self.config.groups:
            g = self.pool.add_group(group, self.generation)
            for index in range(group.workers):
                g.members[index] = self.pool.new_worker(g, index, self.title(g.name, index))

    def title(self, group: str, index: int) -> str:
        return worker_title(self.config.name, group, index)

    def group_config(self, w: Worker | Group) -> GroupConfig:
        config = self.generations[w.generation].group(w.name if isinstance(w, Group) else w.group)
        assert config is not None
        return config

    def _open_channels(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.report_r, self.report_w = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self.report_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        self.selector.register(self.report_r, selectors.EVENT_READ, self.startup.on_report)
        self.ready_r, self.ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(self.ready_w, True)  # a full pipe makes workers wait, not lose their report
        self.selector.register(self.ready_r, selectors.EVENT_READ, self.startup.on_ready_pipe)

    def _add_operations(self) -> None:
        """Stop, status, reload and scale: their code is imported once the first workers are
        forked, so that those do not carry it (~0.25 MiB, and their imports are off the path
        to the first fork: issue 8). No request is read before: the loop has not run yet, the
        listener's backlog holds them."""
        from .commands import Commands, StopReport
        from .roll import Roller

        self.stop_report = StopReport()
        self.roller = Roller(self)
        self.commands = Commands(self)
        self.control = control.Server(self.listener, self.selector, self.commands.handlers(),
                                      self.timers.call_later)

    def _install_signals(self) -> None:
        self._handlers: dict[int, Callable[[], None]] = {  # by number: no enum at each signal
            sig: getattr(self, f"handle_{signal.Signals(sig).name.lower()}") for sig in HANDLED_SIGNALS}
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)

    def _master_only_fds(self) -> list[tuple[int, int]]:
        """Descriptors a worker must not keep (the listener would hold the lock), as runs
        [lo, hi): computed in the master before fork, in O(runs), not O(workers)."""
        # the listener too: the first workers are forked before it is in the selector
        fds = [self.wake_w, self.selector.fileno(), self.output.fileno(), self.listener.fileno()]
        if self.commands is not None:
            fds.extend(self.commands.waiting_fds())
        fds += [self.startup.notify_fd or -1, self.notifier.fileno()]
        return ranges_with(self.selector.fds.ranges(), fds)

    # --- the loop -------------------------------------------------------------------

    def run(self) -> int:
        """Run until every worker has stopped; return the exit code."""
        proctitle.setproctitle(f"{self.config.name}-master")
        logs.set_title(f"{self.config.name}-master")
        libc.become_subreaper()  # what tasks leave behind is ours to stop: leftovers.py
        control.listen(self.listener)
        self._open_channels()
        self._install_signals()
        output.prepare_for_workers()
        # every resident page is a page-table entry that each fork copies and each worker's
        # exit tears down (the top kernel function of a stop of 2,000 workers: issue 8)
        libc.release_free_memory()
        gc.freeze()  # keep the master's objects out of the workers' copied pages
        self.output.hold()  # forked after the first batch of workers: see OutputProcess.hold
        log.info("starting %d workers", len(self.startup.awaiting))
        workers = list(self.pool.all_workers())
        self.spawn_many(workers[:SPAWN_BATCH])
        if not self.output.start():
            self._replace_output_writers("nothing reads them")
        self.spawn_many(workers[SPAWN_BATCH:])
        self._add_operations()
        if self.aux is not None:
            self.aux.start()
        while not self._finished():
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - a bug of ours must not orphan the pool
                self._survive_internal_error()
        self._finish()
        return self.exit_code

    def _turn(self) -> None:
        """One turn of the loop: wait, then handle what came."""
        self._wait_for_events()
        self._dispatch_signals()
        self.timers.run_due()
        self._run_helper_timers()

    def _survive_internal_error(self) -> None:
        """Log a bug of the master with its traceback and go on; if the same turn keeps failing,
        stop the instance rather than spin."""
        now = time.monotonic()
        self.internal_errors = [t for t in self.internal_errors if now - t < INTERNAL_ERROR_WINDOW] + [now]
        log.exception("internal error in the master's loop (please report it); going on")
        if len(self.internal_errors) >= INTERNAL_ERROR_LIMIT and not self.stopping:
            self.begin_stop("too many internal errors")
        elif len(self.internal_errors) >= 2 * INTERNAL_ERROR_LIMIT:
            self.force_stop()

    def _wait_for_events(self) -> None:
        self.output.flush()  # what this turn queued for the output process, in one message
        timeout = 0 if self.pending_signals else self.timers.timeout()
        for due in self._helper_deadlines():
            until = max(0.0, due - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        for key, _ in self.selector.select(timeout):
            key.data(key.fileobj)

    def _helper_deadlines(self) -> list[float]:
        """The systemd notifier's and the metrics process's own timers, when they have one."""
        due = []
        if (systemd_due := self.notifier.next_due()) is not None:
            due.append(systemd_due)  # only when systemd asked for a watchdog, or a stop is long
        if (output_due := self.output.next_due()) is not None:
            due.append(output_due)  # only at the end of a stop
        if self.aux is not None and (aux_due := self.aux.next_due(self.stopping)) is not None:
            due.append(aux_due)
        return due

    def _run_helper_timers(self) -> None:
        now = time.monotonic()
        self.notifier.run_due(now)
        self.output.run_due(now)
        if self.aux is not None:
            self.aux.run_due(now, self.stopping)

    def _on_wake(self, fd: int) -> None:
        worker.drain_pipe(fd)  # the same wake-up pipe drain as a worker's: no raise when empty

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
            self._handlers[signum]()

    # --- signals ---------------------------------------------------------------------

    def handle_sigchld(self) -> None:
        self.reap_children()  # a worker that was not ready has its reports read there first

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
            self.output.reopen(log.fd)  # it writes the log: the new file is for it too
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
        self.spawn_many([w])

    def spawn_many(self, workers: list[Worker]) -> None:
        """Fork processes for several positions, SPAWN_BATCH at a time, with nothing but the
        forks between the forks: after each fork every page of the master is shared with the
        newest child, and each page the master then writes is copied (a fault, ~2 us + the copy;
        ~180 pages per worker of bookkeeping between forks: issue 8). So specs and pipes are
        made before a batch and the bookkeeping is done after it."""
        for i in range(0, len(workers), SPAWN_BATCH):
            self._spawn_batch(workers[i:i + SPAWN_BATCH])

    def _spawn_batch(self, workers: list[Worker]) -> None:
        prepared: list[tuple[Worker, GroupConfig, worker.WorkerSpec]] = []
        for w in workers:
            w.cancel_timer()
            group = self.group_config(w)
            spec = self._spec(w, group)
            try:  # without an output process (it could not be forked), fd 1 and 2 are the master's
                spec.output = output.Pipes.open() if self.output.accepting else None
            except OSError as exc:
                self._fork_failed(w, exc)
                continue
            prepared.append((w, group, spec))
        # each child closes every pipe of the batch too: its own are on fd 1 and 2 by then
        master_fds = merged(ranges_with(self._master_only_fds(), self.output.held_fds()) + [
            r for _, _, spec in prepared if spec.output for r in spec.output.fd_runs()])
        pids: list[int] = []
        error: OSError | None = None
        old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)  # no enum wrapping
        try:
            for _, _, spec in prepared:
                pid = os.fork()
                if pid == 0:
                    worker.run(spec, master_fds)
                pids.append(pid)
        except OSError as exc:
            error = exc
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        if len(pids) == 1 and self.first_exit_of_turn:
            # the replacement runs first: the kernel queues a new child on the master's CPU, where
            # the bookkeeping below (each page it writes, shared with the child now, is copied)
            # kept it waiting ~0.5 ms (issue 8: respawn medians -9 %, 120 interleaved kills).
            # Once a turn only: each yield puts the master behind every runnable worker, which
            # made a storm of 20 deaths among 40 busy workers take 0.72 s instead of 0.50.
            os.sched_yield()
        for (w, group, spec), pid in zip(prepared[:len(pids)], pids, strict=True):
            self._forked(w, group, spec, pid)
        self.output.flush()  # the batch's read ends, in one message
        for w, _, spec in prepared[len(pids):]:
            if spec.output is not None:
                spec.output.close()
            self._fork_failed(w, error)  # type: ignore[arg-type]

    def _spec(self, w: Worker, group: GroupConfig) -> worker.WorkerSpec:
        slot = self.slots[w.slot]
        slot.prepare_spawn()  # not the state its predecessor died in
        return worker.WorkerSpec(
            title=w.title, group=w.group, index=w.index,
            task=group.task, setup=group.setup, teardown=group.teardown,  # type: ignore[arg-type]
            slot=slot, report=self.report_w, master_pid=self.pid, ready_fd=self.ready_w,
            max_tasks=group.max_tasks or 0, max_memory=int(group.max_memory or 0),
            histogram=bool(getattr(self.config, "metrics", None)),
            jobs=worker.jobs_of(self.config, group), concurrency=group.concurrency or 1,  # work queues
        )

    def _fork_failed(self, w: Worker, exc: OSError) -> None:
        log.error("cannot fork %s: %s; retrying in 1s", w.title, exc.strerror)
        w.move(Phase.BACKOFF)
        w.timer = self.timers.call_later(1.0, self.life.restart, w)

    def _forked(self, w: Worker, group: GroupConfig, spec: worker.WorkerSpec, pid: int) -> None:
        if spec.output is not None:
            self.output.watch(spec.output, w.title, pid)
        w.move(Phase.STARTING)
        w.pid = pid
        w.started_at = time.monotonic()
        w.ready = False
        w.ending = None
        self.pool.by_pid[pid] = w
        self.guards.on_spawn(w, group)

    def reap_children(self) -> None:
        """The one place that reaps: every exited child, since signals coalesce.

        The first exit is handled as soon as it is reaped, so its replacement is forked
        before the look for more: a `waitpid` that finds nothing walks every child in the
        kernel (~0.1 ms at 2,000 workers, issue 8). The others are collected first and
        handled after, so that workers which die at once cannot keep this loop (and the
        loop's other duties) going forever.
        """
        first = _reap_one()
        if first is None:
            return
        self.first_exit_of_turn = True
        try:
            self._handle_exit(*first)
        finally:
            self.first_exit_of_turn = False
        exited = []
        while (more := _reap_one()) is not None:
            exited.append(more)
        for pid, status in exited:
            self._handle_exit(pid, status)
        # a worker's exit may leave its own children to us: look a little later,
        # off the respawn path (reading /proc competes with the new worker)
        self.leftovers.sweep_soon()

    def _handle_exit(self, pid: int, status: int) -> None:
        if self.aux is not None and self.aux.reaped(pid, status, self.stopping):
            return
        if self.output.reaped(pid, status):
            self._output_process_ended()
            return
        w = self.pool.by_pid.get(pid)
        if w is None:
            self.leftovers.reaped(pid, status)
            return
        if not w.ready:  # what it reported before its exit ("R", or setup's traceback) is there
            self.startup.on_ready_pipe(self.ready_r)  # by now: read it before judging the exit
            self.startup.on_report(self.report_r)
        del self.pool.by_pid[pid]
        self.life.on_exit(w, status)

    def _output_process_ended(self) -> None:
        """Unless at the end of a stop: start another and replace the workers it read for,
        at their next task boundary (nothing reads their pipes any more)."""
        if self.stopping or not self.output.start():
            return
        self._replace_output_writers("were read by the process that died")

    def _replace_output_writers(self, why: str) -> None:
        """Replace the live workers at their next task boundary: their output pipes `why`."""
        live = [w for w in self.pool.live() if w.phase is not Phase.RETIRING and not w.ending]
        if live:
            log.warning("replacing %d workers at their next task boundary: their output pipes %s",
                        len(live), why)
        for w in live:
            w.ending = "output"
        self._signal_all([w.pid for w in live], signal.SIGTERM)

    # --- stopping ------------------------------------------------------------------------------

    def begin_stop(self, why: str, timeout: float | None = None) -> None:
        """Ask every worker to finish its current task and exit."""
        if self.stopping:
            return
        self.stopping = True
        live = self.pool.live()
        log.info("stopping (%s): asking %d workers to finish their tasks", why, len(live))
        self.roller.abort_for_stop()
        to_signal = []
        for w in list(self.pool.all_workers()):
            if w.alive:
                if w.phase is not Phase.RETIRING:
                    self.life.retire(w, "stop", timeout, send=False)
                    to_signal.append(w.pid)
                elif timeout is not None:  # a stop's own deadline also applies to those already retiring
                    self.life.kill_later(w, timeout)
            else:
                self.life.end_position(w)
        self._signal_all(to_signal, signal.SIGTERM)
        status = f"stopping ({why}): waiting for {len(live)} workers to finish their tasks"
        self.notifier.begin_stop(self._last_kill_deadline(timeout), status)
        self.leftovers.sweep()

    def _signal_all(self, pids: list[int], sig: int) -> None:
        """Signal many workers after the bookkeeping, with no Python work in between and the
        master's signals blocked: each signal wakes a worker that may take the master's core,
        and its SIGCHLD must not run a handler mid-batch (issue 8: idle stop)."""
        old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            for pid in pids:
                signal_child(pid, sig)
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)

    def _last_kill_deadline(self, timeout: float | None) -> float:
        now = time.monotonic()
        if timeout is not None:
            return now + timeout
        return now + max((self.config.group_timeout(g) for c in self.generations.values() for g in c.groups),
                         default=0.0)

    def force_stop(self) -> None:
        for w in self.pool.live():
            w.cancel_timer()
            self.life.kill(w, "a stop-now was asked")

    def _finished(self) -> bool:
        if not self.stopping or self.pool.by_pid:
            return False
        self.leftovers.sweep()
        aux_running = self.aux is not None and self.aux.stop()  # last: metrics stay up while workers stop
        if self.leftovers.any() or aux_running:
            return False
        return not self.output.stop()  # the very last: it drains every pipe and writes the log

    def _finish(self) -> None:
        report = self.stop_report
        if report.killed or self.startup.error:
            self.exit_code = 1
        self.startup.finish()  # the output process drained every worker's pipes before it exited
        self.commands.answer_stop_waiters()
        log.info("stopped: %d workers exited, %d killed", len(report.stopped), len(report.killed))
