"""tprocess: a pre-fork supervisor for long-lived Python worker processes.

The names below are imported on first use, so that `tprocess stop` and
`tprocess status` do not pay for the modules only `start` needs.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs milliseconds on every command; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config", "ConfigError": "config", "GroupConfig": "config",
    "StartError": "supervisor", "StartResult": "supervisor", "Supervisor": "supervisor",
    "Context": "worker",
    "Queue": "queue", "Reject": "queue",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tprocess' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
