"""The `status` table, drawn with rich (imported only here, off the start path)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

STATE_STYLES = {
    "running": "green", "idle": "green", "busy": "cyan", "starting": "yellow",
    "stopping": "yellow", "backoff": "magenta", "failed": "bold red", "stopped": "dim",
}


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


def format_bytes(count: int | None) -> str:
    return "-" if not count else f"{count / 2**20:.1f}M"


def render(status: dict[str, Any]) -> None:
    master = status["master"]
    table = Table(title=f"tprocess {status['name']!r}", title_justify="left")
    for column in ("NAME", "PID", "STATE", "UPTIME", "TASKS", "ERRORS", "RESTARTS", "RSS"):
        justify = "left" if column in ("NAME", "STATE") else "right"
        table.add_column(column, justify=justify, no_wrap=True)
    table.add_row(f"{status['name']}-master", str(master["pid"]), _state(master["state"]),
                  format_uptime(master["uptime"]), "", "", "", format_bytes(master.get("rss")))
    for w in status["workers"]:
        table.add_row(w["name"], str(w["pid"] or "-"), _state(w["state"]),
                      format_uptime(w["uptime"]) if w["pid"] else "-",
                      str(w["tasks"]), str(w["errors"]), str(w["restarts"]),
                      format_bytes(w.get("rss")))
    console = Console()
    if not console.is_terminal:  # a pipe or a file: never fold names to 80 columns
        console = Console(width=200)
    console.print(table)


def _state(state: str) -> str:
    style = STATE_STYLES.get(state, "")
    return f"[{style}]{state}[/]" if style else state
