"""tprocess: a pre-fork supervisor for long-lived Python worker processes.

The names below are imported on first use, so that `tprocess stop` and
`tprocess status` do not pay for the modules only `start` needs.
"""

from __future__ import annotations

import sys
import types

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


class _OnFirstUse(types.ModuleType):
    """A module imported when one of its attributes is first asked for."""

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        module = __import__(self.__name__)  # the real one, now in sys.modules
        self.__dict__.update(module.__dict__)  # later lookups through this one are direct
        return getattr(module, attr)


def _import_inspect_on_first_use() -> None:
    """`dataclasses` imports `inspect` (with ast, dis and tokenize: ~9 ms of every start, and
    ~1.3 MiB in the master that each fork copies and each worker's exit tears down: issue 8)
    for one call, which writes a docstring for a dataclass without one; ours all have one.
    So `inspect` stands in sys.modules as a module that imports the real one on first use
    (an `import inspect` alone does not use it; importlib's LazyLoader would load at once,
    since the import statement reads the module's __spec__)."""
    if "inspect" not in sys.modules:
        sys.modules["inspect"] = _OnFirstUse("inspect")


_import_inspect_on_first_use()


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tprocess' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
