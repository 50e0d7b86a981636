"""The `status` table, printed with rich (imported only here, off the start path).

The table is laid out here, not with rich's Table: rich measures and renders every
cell on its own, about 0.5 ms a row, too slow for thousands of workers. Here each
column's width is the longest of its plain strings, and the whole table is one
Text printed with soft wrap (names are never folded, whatever the width).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

STATE_STYLES = {
    "running": "green", "idle": "green", "busy": "cyan", "starting": "yellow", "reloading": "yellow",
    "stopping": "yellow", "backoff": "magenta", "failed": "bold red", "stopped": "dim",
}
COLUMNS = ("NAME", "PID", "STATE", "UPTIME", "TASK", "TASKS", "ERRORS", "RESTARTS", "RSS", "REASON")
LEFT = {"NAME", "STATE", "REASON"}
STATE_COLUMN = COLUMNS.index("STATE")
GAP = "  "


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_seconds(seconds: Any) -> str:
    """A running time: tenths below a minute (tasks are often short), else like an uptime."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        return "-"
    return f"{seconds:.1f}s" if seconds < 60 else format_uptime(seconds)


def format_bytes(count: int | None) -> str:
    return "-" if not count else f"{count / 2**20:.1f}M"


def render(status: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        console = Console()
    rows = [COLUMNS, _master_row(status), *(_worker_row(w) for w in status.get("workers") or [])]
    text = Text()
    text.append(f"tprocess {status.get('name', '?')!r}\n", style="bold")
    text.append_text(layout(rows))
    for line in group_lines(status):
        text.append("\n" + line)
    console.print(text, soft_wrap=True)  # soft wrap: never fold a line, a pipe gets it whole


def layout(rows: Sequence[Sequence[str]]) -> Text:
    """Aligned columns; the first row is the bold header; each STATE in its colour."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    text = Text()
    for number, row in enumerate(rows):
        if number:
            text.append("\n")
        start = len(text)
        used = max((i for i, cell in enumerate(row) if cell), default=0) + 1  # no trailing blanks
        for i, cell in enumerate(row[:used]):
            pad = " " * (widths[i] - len(cell))
            if i:
                text.append(GAP)
            if COLUMNS[i] not in LEFT:
                text.append(pad + cell)
                continue
            text.append(cell, STATE_STYLES.get(cell) if i == STATE_COLUMN and number else None)
            if i < used - 1:
                text.append(pad)
        if not number:
            text.stylize("bold", start, len(text))
    return text


def _master_row(status: dict[str, Any]) -> tuple[str, ...]:
    master = status.get("master") or {}
    uptime = master.get("uptime")
    return (f"{status.get('name', '?')}-master", str(master.get("pid") or "-"), str(master.get("state", "-")),
            format_uptime(uptime) if isinstance(uptime, int | float) else "-", "", "", "", "",
            format_bytes(master.get("rss")), "")


def _worker_row(w: dict[str, Any]) -> tuple[str, ...]:
    pid = w.get("pid")
    uptime = w.get("uptime")
    return (str(w.get("name", "?")), str(pid or "-"), str(w.get("state", "-")),
            format_uptime(uptime) if pid and isinstance(uptime, int | float) else "-",
            format_seconds(w.get("task_time")), _count(w.get("tasks")), _count(w.get("errors")),
            _count(w.get("restarts")), format_bytes(w.get("rss")), str(w.get("last_reason") or "-"))


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) else "-"


# --- groups: one line each under the table (also the rows of `top`) -------------------------------


def group_summaries(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Each group's figures: the master's "groups" when it sends them, filled in from
    the workers for whatever it does not send (an older master sends no groups)."""
    workers = status.get("workers") or []
    by_group: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        by_group.setdefault(str(w.get("group", "")), []).append(w)
    reported = [g for g in status.get("groups") or [] if isinstance(g, dict)]
    groups = reported or [{"name": name} for name in by_group]
    return [_summary(g, by_group.get(str(g.get("name", "")), [])) for g in groups]


def _summary(group: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, Any]:
    states: dict[str, int] = {}
    for w in workers:
        states[str(w.get("state", "-"))] = states.get(str(w.get("state", "-")), 0) + 1
    restarts = group.get("restarts")
    if not isinstance(restarts, dict):  # no reasons from this master: the total only
        restarts = sum(w.get("restarts") or 0 for w in workers)
    return {
        "name": str(group.get("name", "")),
        "workers": _int_or(group.get("workers"), len(workers)),
        "running": _int_or(group.get("running"), sum(1 for w in workers if w.get("pid"))),
        "tasks": _int_or(group.get("tasks"), sum(w.get("tasks") or 0 for w in workers)),
        "errors": _int_or(group.get("errors"), sum(w.get("errors") or 0 for w in workers)),
        "states": group["states"] if isinstance(group.get("states"), dict) else states,
        "restarts": restarts,
        "tasks_per_sec": group.get("tasks_per_sec"),
        "rate_window": group.get("rate_window"),
        "queue": group.get("queue") if isinstance(group.get("queue"), dict) else None,
    }


def group_lines(status: dict[str, Any]) -> list[str]:
    """`group ip: 5/5 workers, 1234 tasks, 12.3 tasks/s (last 60s), restarts: crash 2, max_tasks 10`"""
    lines = []
    for g in group_summaries(status):
        rate, window = g["tasks_per_sec"], g["rate_window"]
        rate_text = f"{rate:.1f}" if isinstance(rate, int | float) else "-"
        window_text = f" (last {window:g}s)" if isinstance(window, int | float) else ""
        lines.append(f"group {g['name'] or '(unnamed)'}: {g['running']}/{g['workers']} workers, "
                     f"{g['tasks']} tasks, {rate_text} tasks/s{window_text}, "
                     f"restarts: {restarts_text(g['restarts'])}"
                     + (f", queue {queue_text(g['queue'])}" if g["queue"] else ""))
    return lines


def queue_text(queue: dict[str, Any] | None) -> str:
    """`ip: 120 waiting, 0 delayed, 5 running, 2 dead` (the depth the client read from the broker)."""
    if not queue:
        return "-"
    name = str(queue.get("name", "?"))
    if queue.get("error"):
        return f"{name}: broker error: {queue['error']}"
    if "waiting" not in queue:
        return name
    return (f"{name}: {queue.get('waiting')} waiting, {queue.get('delayed')} delayed, "
            f"{queue.get('running')} running, {queue.get('dead')} dead")


def restarts_text(restarts: Any) -> str:
    """The non-zero reasons (`crash 2, max_tasks 10`), or a bare total when no reasons are known."""
    if isinstance(restarts, dict):
        return ", ".join(f"{reason} {n}" for reason, n in restarts.items() if n) or "0"
    return str(restarts or 0)


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
