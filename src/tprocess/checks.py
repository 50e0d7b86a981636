"""The checks the command line needs on its fast path (stop, status, scale, reload).

They live apart from config.py so that those commands do not import the config's
dataclasses (dataclasses pulls in inspect: milliseconds on every command).
config.py re-exports every name here.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# a name: letters, digits, '_' and '.', with single '-' between them; read with set and str
# methods, not a regular expression: `re` (with `enum`) is ~6 ms of each `stop`
NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
NAME_CHARS = NAME_FIRST | frozenset("_.-")
MAX_NAME_LEN = 48
MAX_TIMEOUT = 7 * 24 * 3600.0
DEFAULT_NAME = "tprocess"


class ConfigError(Exception):
    """A user's configuration mistake: one line, no traceback."""

    def __init__(self, message: str) -> None:
        # user text (an exception message, a key) may hold line breaks: keep one line
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


def check_name(name: Any, where: str = "name") -> str:
    """Validate an instance name, which is also the process title prefix."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a string, got {_show(name)}")
    if len(name) > MAX_NAME_LEN:
        raise ConfigError(
            f"{where}: {_show(name)} is {len(name)} characters; at most {MAX_NAME_LEN} allowed"
        )
    if not is_name(name):
        raise ConfigError(
            f"{where}: {_show(name)} is not a valid name; use letters, digits, '_', '.' and "
            "single '-' between them (no spaces, slashes or control characters)"
        )
    return name


def is_name(text: str) -> bool:
    return (text[:1] in NAME_FIRST and NAME_CHARS.issuperset(text)
            and "--" not in text and not text.endswith("-"))


def check_seconds(value: Any, where: str, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number of seconds, got {_show(value)}")
    low_ok = value >= 0 if allow_zero else value > 0
    # comparisons, not math.isfinite: they reject NaN and inf, and never overflow on a huge int
    if not (low_ok and value <= MAX_TIMEOUT):
        bound = "0" if allow_zero else "more than 0"
        raise ConfigError(
            f"{where}: expected {bound} to {int(MAX_TIMEOUT)} seconds, got {_show(value)}"
        )
    return float(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
