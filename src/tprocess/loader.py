"""Resolving 'FILE.py:function' and 'module:function' references to callables.

This runs in the command's own process before anything is forked or detached,
so a typo or a broken import is reported at once and nothing is left running.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from types import ModuleType

from .config import Config, ConfigError, TaskRef

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import Any

CO_VARARGS = 0x04  # a code object's flag for *args

_file_modules: dict[str, ModuleType] = {}  # real path -> module
_user_modules: set[str] = set()  # modules of the user's own code, imported by resolve_config


def resolve_config(config: Config) -> None:
    """Replace every string reference in config by the callable it names."""
    before = set(sys.modules)
    try:
        for group in config.groups:
            where = f"{config.source}: groups.{group.name}" if group.name else config.source
            for key in ("task", "setup", "teardown"):
                ref = getattr(group, key)
                if ref is not None:
                    group.refs.setdefault(key, ref)
                    jobs = key == "task" and bool(getattr(group, "queue", None))  # task(ctx, job)
                    setattr(group, key, resolve(ref, config.base_dir, f"{where}: {key}", takes_ctx=True,
                                                takes_job=jobs))
            _check_concurrency(group, where)
    finally:
        _user_modules.update(name for name in set(sys.modules) - before if _is_user_code(sys.modules[name]))


def reload_code(config: Config) -> None:
    """resolve_config with the user's modules imported afresh; on failure, put the old ones back."""
    saved_modules = dict(sys.modules)
    saved_files = dict(_file_modules)
    saved_user = set(_user_modules)
    for name in _user_modules:
        _forget_bytecode(sys.modules.pop(name, None))
    _file_modules.clear()
    _user_modules.clear()
    importlib.invalidate_caches()
    try:
        resolve_config(config)
    except BaseException:
        sys.modules.clear()
        sys.modules.update(saved_modules)
        _file_modules.clear()
        _file_modules.update(saved_files)
        _user_modules.clear()
        _user_modules.update(saved_user)
        raise


def _forget_bytecode(module: ModuleType | None) -> None:
    """Drop a user module's cached bytecode: a file edited within the same second and to
    the same size would pass the cache's mtime-and-size check and run the old code."""
    cached = getattr(module, "__cached__", None)
    if cached:
        try:
            os.unlink(cached)
        except OSError:
            pass


def _installed_dirs() -> tuple[str, ...]:
    """The standard library's folder (its extension modules live under it), the installed
    packages' folders and tprocess's own. Not from sysconfig: at every start it would add
    ~0.7 ms and 260 KiB to the master, inherited by every worker (issue 8)."""
    import site

    dirs = {os.path.dirname(os.__file__)}
    dirs.update(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tprocess itself
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def _is_user_code(module: ModuleType | None) -> bool:
    """A module of the user's own code: it has a source file outside the standard
    library, the installed packages and tprocess itself."""
    filename = getattr(module, "__file__", None)
    if not filename:
        return False
    return not os.path.realpath(filename).startswith(_installed_dirs())


def _check_concurrency(group: Any, where: str) -> None:
    """`concurrency` above 1 needs an `async def` task: a plain one runs one call at a time."""
    concurrency = getattr(group, "concurrency", None)
    if concurrency and concurrency > 1:
        from .aio import is_async

        if not is_async(group.task):
            raise ConfigError(f"{where}: concurrency: {concurrency} needs an `async def` task; "
                              f"{getattr(group.task, '__qualname__', group.task)!r} is a plain function")


def resolve(ref: TaskRef, base_dir: str, where: str, takes_ctx: bool = True,
            takes_job: bool = False) -> Callable[..., Any]:
    """Import a reference and return a callable taking one argument (ctx), or two (ctx, job) for
    the task of a group with a queue."""
    func = ref if callable(ref) else _import_ref(ref, base_dir, where)
    if not callable(func):
        raise ConfigError(f"{where}: {ref!r} is not callable (it is a {type(func).__name__})")
    if takes_job:
        return _check_job_task(func, where)
    return _adapt(func, where) if takes_ctx else func


def _check_job_task(func: Callable[..., Any], where: str) -> Callable[..., Any]:
    """A queue group's task is called as task(ctx, job): its signature must accept that."""
    if _plain_function_takes(func, 2):
        return func
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return func  # builtins and the like: trust the caller
    try:
        sig.bind(None, None)
    except TypeError:
        raise ConfigError(
            f"{where}: {getattr(func, '__qualname__', func)!r} is the task of a queue group: it must take "
            f"two arguments (ctx, job); its signature is {sig}"
        ) from None
    return func


def _import_ref(ref: str, base_dir: str, where: str) -> Any:
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py") or "/" in target:
        module = _import_file(os.path.join(base_dir, target), ref, where)
    else:
        module = _import_module(target, base_dir, ref, where)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{where}: {target} has no attribute {attr!r}") from None
    return obj


def _import_file(path: str, ref: str, where: str) -> ModuleType:
    path = os.path.realpath(path)  # os.path, not pathlib: the master need not import it (issue 8)
    if path in _file_modules:
        return _file_modules[path]
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: {ref!r}: no such file {path!r}")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # let the task file import its neighbours
    stem = os.path.splitext(os.path.basename(path))[0]
    name = stem if stem.isidentifier() else "tprocess_task"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: {ref!r}: cannot import {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    _run_import(lambda: spec.loader.exec_module(module), ref, where)
    _file_modules[path] = module
    return module


def _import_module(name: str, base_dir: str, ref: str, where: str) -> ModuleType:
    folder = str(base_dir)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return _run_import(lambda: importlib.import_module(name), ref, where)


def _run_import(do_import: Callable[[], Any], ref: str, where: str) -> Any:
    try:
        return do_import()
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{where}: {ref!r}: no module named {exc.name!r}") from None
    except SyntaxError as exc:
        raise ConfigError(
            f"{where}: {ref!r}: syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}"
        ) from None
    except BaseException as exc:  # noqa: BLE001 - any failure of user code at import
        line = _user_line(exc)
        raise ConfigError(
            f"{where}: {ref!r}: importing raised {type(exc).__name__}: {exc}{line}"
        ) from None


def _user_line(exc: BaseException) -> str:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    return f" ({last.tb_frame.f_code.co_filename}, line {last.tb_lineno})"


def _plain_function_takes(func: Callable[..., Any], count: int) -> bool:
    """True if func is a plain Python function that can be called with `count` positional
    arguments; False if it cannot tell (inspect.signature decides then). Read from the code
    object, so that `start` does not import inspect (~9 ms) for the usual task."""
    code = getattr(func, "__code__", None)
    if type(func).__name__ != "function" or code is None:
        return False
    required_kw = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
    if set(required_kw) - set(func.__kwdefaults__ or ()):
        return False
    fewest = code.co_argcount - len(func.__defaults__ or ())
    most = code.co_argcount if not code.co_flags & CO_VARARGS else count
    return fewest <= count <= most


def _adapt(func: Callable[..., Any], where: str) -> Callable[..., Any]:
    """Accept functions of one argument (ctx) or none."""
    if _plain_function_takes(func, 1):
        return func
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return func  # builtins and the like: trust the caller
    try:
        sig.bind(None)
        return func
    except TypeError:
        pass
    try:
        sig.bind()
    except TypeError:
        raise ConfigError(
            f"{where}: {getattr(func, '__qualname__', func)!r} must take one argument (ctx) "
            f"or none; its signature is {sig}"
        ) from None

    if inspect.iscoroutinefunction(func):
        async def call_without_ctx(ctx: Any, _func: Callable[[], Any] = func) -> Any:  # type: ignore[misc]
            return await _func()
    else:
        def call_without_ctx(ctx: Any, _func: Callable[[], Any] = func) -> Any:
            return _func()

    call_without_ctx.__qualname__ = getattr(func, "__qualname__", "task")
    return call_without_ctx
