"""The process title (what ps and top show), set through setproctitle's C extension.

The extension is loaded without its package's __init__, which imports `logging` and so
`threading`: that module's at-fork handler alone makes every forked worker copy ~90 more
of the master's pages (~360 KiB per worker, measured: issue 8)."""

from __future__ import annotations

from collections.abc import Callable


def _load() -> Callable[[str], None]:
    import importlib.machinery
    import importlib.util

    try:
        package = importlib.machinery.PathFinder.find_spec("setproctitle")
        folders = package.submodule_search_locations if package else None
        spec = importlib.machinery.PathFinder.find_spec("_setproctitle", folders) if folders else None
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.setproctitle  # type: ignore[no-any-return]
    except (ImportError, OSError):
        pass
    from setproctitle import (
        setproctitle as fallback,  # the package's own way (its pure-Python stub if need be)
    )

    return fallback


setproctitle = _load()
