"""`tprocess top`: a live view of a running instance, redrawn in place with rich.

top only polls: every `interval` seconds it asks the master for its status (the
same request as `status`), so a master costs nothing while nobody runs top. Rates
and CPU are computed here, from the differences between successive samples: the
groups' cumulative task counters, and each process's utime + stime in /proc.

Keys: `q` quits (stdin in cbreak mode while top runs; the terminal modes are
restored on every way out); Ctrl-C, SIGTERM and SIGHUP quit too. The signal
handlers only set a flag and wake the loop (signal.set_wakeup_fd), so no
exception ever interrupts the drawing or the restoring of the terminal.
"""

from __future__ import annotations

import math
import os
import select
import signal
import sys
import termios
import time
import tty
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import control
from .discovery import stat_fields
from .status_view import (
    STATE_STYLES,
    format_bytes,
    format_seconds,
    format_uptime,
    group_summaries,
    queue_text,
    restarts_text,
)

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
RATE_WINDOW = 60.0  # seconds of history behind the rate average and the sparkline
SPARK_WIDTH = 30  # characters of sparkline; older samples are averaged together to fit
LOG_LINES = 8
MIN_INTERVAL = 0.1  # a faster poll would cost the master more than it shows
STATE_ORDER = ("busy", "idle", "starting", "stopping", "backoff", "failed", "stopped")
BATCH_WIDTH = 200  # output to a pipe or a file: wide enough that nothing is cut
UNLIMITED = 10**9  # lines: a pipe or a file shows every worker
# a task's output in the log may hold escape sequences: never let them drive the terminal
CONTROL_CHARS = {c: "?" for c in [*range(0x20), 0x7F] if c != 0x09} | {0x09: " "}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --- pure pieces: sparkline, counter deltas, rates, CPU ------------------------------------------


def sparkline(values: Sequence[float | None], width: int = SPARK_WIDTH) -> str:
    """One block character per value, scaled to the largest; None (no sample yet) is a space.

    More values than `width`: consecutive values are averaged so the line covers them all.
    """
    values = _squeeze(list(values), width)
    known = [v for v in values if v is not None]
    top = max(known, default=0.0)
    steps = len(SPARK_BLOCKS) - 1
    return "".join(
        " " if v is None else SPARK_BLOCKS[round(steps * v / top) if top > 0 else 0] for v in values
    )


def _squeeze(values: list[float | None], width: int) -> list[float | None]:
    if len(values) <= width:
        return values
    out: list[float | None] = []
    for i in range(width):
        chunk = [v for v in values[i * len(values) // width:(i + 1) * len(values) // width]
                 if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def counter_delta(previous: int | None, current: int) -> int:
    """Tasks done between two samples of one worker's counter, never negative.

    A counter that went down belongs to a replacement worker that started from 0:
    all of its count is new. A worker seen for the first time counts all its tasks.
    """
    if previous is None or current < previous:
        return current
    return current - previous


@dataclass
class RateTracker:
    """Per-group tasks/s from successive samples of cumulative counters.

    Uses the groups' own cumulative "tasks" when the master reports them (a counter
    that goes down, after a scale-down, counts as no progress), else the sum of the
    workers' counters, delta by delta (a replaced worker never makes a rate negative).
    """

    window: float = RATE_WINDOW
    last_time: float | None = None
    groups_seen: dict[str, int] = field(default_factory=dict)
    workers_seen: dict[str, int] = field(default_factory=dict)
    history: dict[str, deque[tuple[float, float, float]]] = field(default_factory=dict)

    def sample(self, status: dict[str, Any], now: float) -> dict[str, float | None]:
        """Record one status sample; return each group's rate over the last interval."""
        deltas = self._deltas(status)
        elapsed = None if self.last_time is None else now - self.last_time
        self.last_time = now
        rates: dict[str, float | None] = {}
        for group, delta in deltas.items():
            if elapsed is None or elapsed <= 0:
                rates[group] = None
                continue
            history = self.history.setdefault(group, deque())
            history.append((now, delta, elapsed))
            while history and history[0][0] < now - self.window:
                history.popleft()
            rates[group] = delta / elapsed
        for gone in set(self.history) - set(deltas):
            del self.history[gone]
        return rates

    def rates(self, group: str) -> list[float]:
        return [delta / elapsed for _, delta, elapsed in self.history.get(group, ())]

    def average(self, group: str) -> float | None:
        """Tasks per second over the window (the time actually covered by samples)."""
        history = self.history.get(group)
        if not history:
            return None
        return sum(h[1] for h in history) / sum(h[2] for h in history)

    def _deltas(self, status: dict[str, Any]) -> dict[str, int]:
        groups = status.get("groups")
        if groups and all(isinstance(g, dict) and isinstance(g.get("tasks"), int) for g in groups):
            return self._group_deltas(groups)
        return self._worker_deltas(status.get("workers") or [])

    def _group_deltas(self, groups: list[dict[str, Any]]) -> dict[str, int]:
        deltas = {}
        for g in groups:
            name, tasks = g.get("name", ""), g["tasks"]
            previous = self.groups_seen.get(name)
            deltas[name] = 0 if previous is None else max(0, tasks - previous)
            self.groups_seen[name] = tasks
        return deltas

    def _worker_deltas(self, workers: list[dict[str, Any]]) -> dict[str, int]:
        first = self.last_time is None
        deltas: dict[str, int] = {}
        seen = {}
        for w in workers:
            tasks = w.get("tasks") or 0
            name = w.get("name", "?")
            delta = 0 if first else counter_delta(self.workers_seen.get(name), tasks)
            group = w.get("group", "")
            deltas[group] = deltas.get(group, 0) + delta
            seen[name] = tasks
        self.workers_seen = seen
        return deltas


@dataclass(frozen=True)
class ProcStat:
    """One sample of a process from /proc."""

    ticks: int  # utime + stime, in clock ticks
    start: int  # start time since boot, in clock ticks: tells a reused pid apart
    rss: int  # bytes


def read_proc_stat(pid: int) -> ProcStat | None:
    fields = stat_fields(pid)
    if fields is None:
        return None
    # fields[0] is field 3 of proc(5): utime 14, stime 15, starttime 22, rss 24
    return ProcStat(int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[21]) * PAGE_SIZE)


def cpu_percent(before: ProcStat | None, after: ProcStat, elapsed: float) -> float | None:
    """CPU% of one process between two samples; None without a comparable earlier one."""
    if before is None or before.start != after.start or elapsed <= 0 or after.ticks < before.ticks:
        return None
    return 100.0 * (after.ticks - before.ticks) / CLOCK_TICKS / elapsed


@dataclass
class CpuSampler:
    """CPU% and RSS of each pid, from /proc/PID/stat read at every sample."""

    last: dict[int, ProcStat] = field(default_factory=dict)
    last_time: float | None = None

    def sample(self, pids: list[int], now: float) -> dict[int, tuple[float | None, int | None]]:
        elapsed = 0.0 if self.last_time is None else now - self.last_time
        current, result = {}, {}
        for pid in pids:
            stat = read_proc_stat(pid)
            if stat is None:
                result[pid] = (None, None)
                continue
            current[pid] = stat
            result[pid] = (cpu_percent(self.last.get(pid), stat, elapsed), stat.rss)
        self.last, self.last_time = current, now
        return result


# --- the model: what top knows after each sample ---------------------------------------------------


@dataclass
class TopModel:
    """What `top` shows, from successive status samples."""

    name: str
    interval: float
    master_pid: int | None = None
    status: dict[str, Any] = field(default_factory=dict)
    rates: RateTracker = field(default_factory=RateTracker)
    cpu: CpuSampler = field(default_factory=CpuSampler)
    last_rates: dict[str, float | None] = field(default_factory=dict)
    proc: dict[int, tuple[float | None, int | None]] = field(default_factory=dict)
    note: str | None = None  # shown in the header: the master did not answer the last poll

    def update(self, master_pid: int, status: dict[str, Any], now: float) -> None:
        self.master_pid, self.status, self.note = master_pid, status, None
        self.last_rates = self.rates.sample(status, now)
        pids = [master_pid] + [w["pid"] for w in status.get("workers") or [] if w.get("pid")]
        self.proc = self.cpu.sample(pids, now)


# --- rendering --------------------------------------------------------------------------------------


def render(model: TopModel, width: int, height: int) -> RenderableType:
    """The whole screen, never taller than `height` lines: every row is one line (no_wrap)."""
    status = model.status
    groups = group_summaries(status)
    header = _header(model, groups)
    log_tail = status.get("log_tail")
    parts: list[RenderableType] = [*header, Text("")]
    used = len(header) + 1
    shown_groups = groups[:max(1, (height - used) // 3)]
    parts.append(_groups_table(model, shown_groups, min(SPARK_WIDTH, max(10, width // 5))))
    used += 1 + len(shown_groups) + (len(groups) > len(shown_groups)) + 1
    if len(groups) > len(shown_groups):
        parts.append(Text(f"... and {len(groups) - len(shown_groups)} more groups", style="dim"))
    parts.append(Text(""))
    log_lines = _log_lines_that_fit(log_tail, height - used)
    log_height = len(log_lines) + 2 if log_lines else 0  # the panel's borders
    worker_rows = height - used - log_height - 1  # the workers' header line
    parts.extend(_workers_section(model, max(0, worker_rows)))
    if log_lines:
        parts.append(_log_panel(log_lines, width))
    return Group(*parts)


def _header(model: TopModel, groups: list[dict[str, Any]]) -> list[Text]:
    status, master = model.status, model.status.get("master") or {}
    running = sum(g["running"] for g in groups)
    target = sum(g["workers"] for g in groups)
    known = [r for r in model.last_rates.values() if r is not None]
    total = f"{sum(known):.1f}" if known else "-"
    cpu, rss = model.proc.get(master.get("pid") or -1, (None, None))
    line1 = Text(no_wrap=True, overflow="ellipsis")
    line1.append(f"{status.get('name', model.name)}-master", style="bold")
    line1.append(f"  pid {master.get('pid', '-')}  ")
    line1.append(str(master.get("state", "-")), style=STATE_STYLES.get(master.get("state", ""), ""))
    line1.append(f"  up {_uptime(master.get('uptime'))}  generation {master.get('generation', '-')}"
                 f"  cpu {_percent(cpu)}  rss {format_bytes(rss)}")
    line2 = Text(no_wrap=True, overflow="ellipsis")
    line2.append(f"workers {running}/{target} running  ")
    line2.append(f"{total} tasks/s", style="bold")
    line2.append(f"  every {model.interval:g}s  q or Ctrl-C quits", style="dim")
    lines = [line1, line2]
    if model.note:
        lines.append(Text(model.note, style="bold red", no_wrap=True, overflow="ellipsis"))
    return lines


def _groups_table(model: TopModel, shown: list[dict[str, Any]], spark_width: int) -> Table:
    table = _table()
    for column, justify in (("GROUP", "left"), ("RUN", "right"), ("STATES", "left"), ("TASKS", "right"),
                            ("ERRORS", "right"), ("NOW/S", "right"), ("1MIN/S", "right"),
                            ("LAST MINUTE", "left"), ("RESTARTS", "left"), ("QUEUE", "left")):
        table.add_column(column, justify=justify, no_wrap=True, overflow="ellipsis")
    for g in shown:
        name = g["name"]
        table.add_row(
            Text(name or "(unnamed)"), f"{g['running']}/{g['workers']}", _states_text(g["states"]),
            _count(g.get("tasks")), _count(g.get("errors")), _rate(model.last_rates.get(name)),
            _rate(model.rates.average(name)), Text(_spark(model, name, spark_width), style="cyan"),
            restarts_text(g.get("restarts")), queue_text(g.get("queue")),
        )
    return table


def _workers_section(model: TopModel, rows: int) -> list[RenderableType]:
    workers = model.status.get("workers") or []
    shown, hidden = pick_workers(workers, model.proc, rows)
    table = _table()
    for column in ("NAME", "PID", "STATE", "TASK", "TASKS", "ERRORS", "RESTARTS", "RSS", "CPU%", "REASON"):
        justify = "left" if column in ("NAME", "STATE", "REASON") else "right"
        table.add_column(column, justify=justify, no_wrap=True, overflow="ellipsis",
                         ratio=1 if column == "REASON" else None)
    for w in shown:
        pid = w.get("pid")
        cpu, rss = model.proc.get(pid, (None, None)) if pid else (None, None)
        state = str(w.get("state", "-"))
        table.add_row(
            Text(str(w.get("name", "?"))), str(pid or "-"), Text(state, style=STATE_STYLES.get(state, "")),
            format_seconds(w.get("task_time")), _count(w.get("tasks")), _count(w.get("errors")),
            _count(w.get("restarts")), format_bytes(rss), _percent(cpu),
            Text(str(w.get("last_reason") or "-")),
        )
    parts: list[RenderableType] = [table]
    if hidden:
        parts.append(Text(f"... and {hidden} more workers", style="dim"))
    return parts


def _spark(model: TopModel, group: str, width: int) -> str:
    """The group's rates, the newest at the right edge: blanks stand for samples not taken yet."""
    rates: list[float | None] = list(model.rates.rates(group))
    slots = min(width, max(1, math.ceil(model.rates.window / model.interval)))
    return sparkline([None] * (slots - len(rates)) + rates, width)


def pick_workers(workers: list[dict[str, Any]], proc: dict[int, tuple[float | None, int | None]],
                 rows: int) -> tuple[list[dict[str, Any]], int]:
    """The workers that fit in `rows` lines, and how many are left out.

    All fit: the master's order (rows stay in place). Too many: the busiest first
    (the longest-running task, then the highest CPU%), one line kept for "... and K more".
    """
    if len(workers) <= rows:
        return workers, 0
    shown = max(0, rows - 1)

    def busiest(w: dict[str, Any]) -> tuple[float, float]:
        task_time = w.get("task_time")
        cpu = proc.get(w.get("pid") or -1, (None, None))[0]
        return (-(task_time if isinstance(task_time, int | float) else -1.0), -(cpu or 0.0))

    return sorted(workers, key=busiest)[:shown], len(workers) - shown


def _log_lines_that_fit(log_tail: list[str] | None, free: int) -> list[str]:
    """Up to LOG_LINES of the tail, fewer when the screen is short (workers need rows too)."""
    if not isinstance(log_tail, list) or not log_tail:
        return []
    room = min(LOG_LINES, len(log_tail), max(0, free - 2 - 4))  # borders, and 4 lines of workers
    return log_tail[-room:] if room else []


def _log_panel(lines: list[str], width: int) -> Panel:
    text = Text("\n".join(str(line).rstrip("\n").translate(CONTROL_CHARS) for line in lines),
                no_wrap=True, overflow="ellipsis")
    return Panel(text, title="log", title_align="left", box=box.SQUARE, padding=(0, 1), width=width)


def _table() -> Table:
    return Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, expand=False,
                 header_style="bold reverse")


def _states_text(states: dict[str, int]) -> Text:
    text = Text()
    for state in sorted(states, key=lambda s: STATE_ORDER.index(s) if s in STATE_ORDER else 99):
        if states[state]:
            if text:
                text.append(" ")
            text.append(f"{state} {states[state]}", style=STATE_STYLES.get(state, ""))
    return text


def _uptime(seconds: Any) -> str:
    return format_uptime(seconds) if isinstance(seconds, int | float) else "-"


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) else "-"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# --- the loop: poll, draw, wait for a key or a signal ----------------------------------------------


class Stopped(Exception):
    """The instance's master went away (or was replaced by another one)."""


def run(name: str, interval: float = 1.0) -> int:
    """Show instance `name` live until `q` or Ctrl-C; 0 then, or when the instance stops."""
    if not MIN_INTERVAL <= interval <= 3600:
        return _error(f"--interval: expected {MIN_INTERVAL} to 3600 seconds, got {interval:g}", 2)
    model = TopModel(name, interval)
    try:
        master_pid, status = poll(name, interval)
    except control.NotRunning:
        return _error(f"tprocess {name!r} is not running", 1)
    except (OSError, ValueError) as exc:
        return _error(f"the master of {name!r} did not answer: {exc or type(exc).__name__}", 1)
    model.update(master_pid, status, time.monotonic())
    console = Console()
    with _quit_signals() as wakeup, _cbreak(sys.stdin) as keys:
        try:
            if console.is_terminal:
                with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                          redirect_stderr=False, get_renderable=lambda: render(model, *console.size)) as live:
                    _loop(model, live.refresh, wakeup, keys)
            else:  # a pipe or a file: every sample in full, one after the other, like `top -b`
                console = Console(width=BATCH_WIDTH)
                _loop(model, lambda: _print_frame(console, model), wakeup, keys)
        except Stopped as exc:
            console.print(str(exc), highlight=False, markup=False)
    return 0


def poll(name: str, interval: float) -> tuple[int, dict[str, Any]]:
    """One status sample: (master pid, status). Raises control.NotRunning."""
    pid, status = control.request(name, {"cmd": "status", "log_lines": LOG_LINES}, timeout=max(2.0, interval))
    if status.get("broker"):  # queue groups: their depth, from the broker (never asked of the master)
        from .queue.depth import add_queue_depths

        add_queue_depths(status)
    return pid, status


def _print_frame(console: Console, model: TopModel) -> None:
    console.print(render(model, BATCH_WIDTH, UNLIMITED))
    console.print()


def _loop(model: TopModel, draw: Callable[[], None], wakeup: int, keys: int | None) -> None:
    draw()
    next_poll = time.monotonic() + model.interval
    while True:
        event = _wait(wakeup, keys, next_poll - time.monotonic())
        if event == "quit":
            return
        if event == "redraw":
            draw()
            continue
        if time.monotonic() >= next_poll:
            _sample(model)
            draw()
            next_poll = max(next_poll + model.interval, time.monotonic() + model.interval / 2)


def _sample(model: TopModel) -> None:
    old_pid = model.master_pid
    try:
        master_pid, status = poll(model.name, model.interval)
    except control.NotRunning:
        raise Stopped(f"tprocess {model.name!r} stopped (master pid {old_pid} is gone)") from None
    except (OSError, ValueError) as exc:  # a time-out, or a master that closed without answering
        model.note = f"the master did not answer: {exc or type(exc).__name__}"
        return
    if master_pid != old_pid:
        raise Stopped(f"tprocess {model.name!r} stopped (master pid {old_pid} is gone; "
                      f"a new master, pid {master_pid}, runs now)")
    model.update(master_pid, status, time.monotonic())


_received: list[int] = []  # signals seen since the last wait


def _wait(wakeup: int, keys: int | None, timeout: float) -> str | None:
    """Wait up to `timeout` for a key or a signal: "quit", "redraw" or None (time to poll)."""
    fds = [wakeup] if keys is None else [wakeup, keys]
    readable, _, _ = select.select(fds, [], [], max(0.0, timeout))
    if wakeup in readable:
        os.read(wakeup, 512)
    if keys is not None and keys in readable:
        try:
            data = os.read(keys, 512)
        except OSError:  # EIO: the terminal hung up
            return "quit"
        if not data or b"q" in data or b"Q" in data:  # EOF: the terminal is gone
            return "quit"
    signals, _received[:] = list(_received), []
    if any(s != signal.SIGWINCH for s in signals):
        return "quit"
    return "redraw" if signals else None


@contextmanager
def _quit_signals() -> Iterator[int]:
    """SIGINT, SIGTERM, SIGHUP end top, SIGWINCH redraws: handlers only note the signal and
    wake the select through a pipe, so no exception can cut the drawing or the restore."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH)
    previous = {sig: signal.signal(sig, _note_signal) for sig in handled}
    old_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield read_end
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(read_end)
        os.close(write_end)


def _note_signal(signum: int, frame: object) -> None:
    _received.append(signum)


@contextmanager
def _cbreak(stream: Any) -> Iterator[int | None]:
    """Keys one by one, without echo, while top runs (no line editing to wait for Enter);
    the terminal's modes come back on every exit. Not a terminal: no keys (Ctrl-C only)."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        fd = -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)  # TCSANOW: a key typed already is not thrown away
    try:
        yield fd
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass  # the terminal is gone: nothing left to restore


def _error(message: str, code: int) -> int:
    print(f"tprocess: error: {message}", file=sys.stderr)
    return code
