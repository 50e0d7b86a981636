"""The C library calls the standard library lacks: prctl (death signal, subreaper) and
malloc_trim.

Through ctypes' C core (`_ctypes`), as `ctypes.CDLL(None)` does: `ctypes` itself adds its
Python layer (struct, the endian structures, every C type), ~1.7 ms of each `start` and
~0.17 MiB that the master and every worker would hold (issue 8).
"""

from __future__ import annotations

import _ctypes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class _CInt(_ctypes._SimpleCData):
    _type_ = "i"  # a C int: what these functions return, as ctypes.c_int


class _CFunction(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL
    _restype_ = _CInt


class _Library:
    """The process's own symbols (the C library among them): `_handle` is what CFuncPtr reads."""

    def __init__(self) -> None:
        self._handle = _ctypes.dlopen(None, _ctypes.RTLD_LOCAL)

    def function(self, name: str) -> Callable[..., int]:
        """The C function `name` (int arguments, an int result); AttributeError if there is none."""
        return _CFunction((name, self))  # type: ignore[no-any-return]


_process = _Library()  # opened once in the master, inherited by fork
_prctl = _process.function("prctl")  # in every Linux C library
try:
    _malloc_trim: Callable[..., int] | None = _process.function("malloc_trim")
except AttributeError:  # glibc's own: musl has none
    _malloc_trim = None


def set_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies."""
    _prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def become_subreaper() -> None:
    """Become the parent of orphaned descendants instead of PID 1."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
