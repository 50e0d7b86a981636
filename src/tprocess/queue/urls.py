"""Broker URLs: `sqlite:///ABS/PATH`, `sqlite://REL/PATH`, `redis://[:PASSWORD@]HOST[:PORT][/DB]`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import ConfigError
from .broker import Broker


@dataclass(frozen=True)
class BrokerURL:
    """A broker address, parsed and checked."""

    scheme: str  # "sqlite" or "redis"/"rediss"
    url: str  # normalised: sqlite with an absolute path
    path: str | None = None  # sqlite: the database file
    host: str | None = None
    port: int | None = None
    db: int | None = None


def default_broker_url(name: str) -> str:
    """The embedded default: a SQLite file beside the instance's default log file."""
    from ..logs import default_log_file

    folder = os.path.dirname(default_log_file(name))
    return "sqlite://" + os.path.join(folder, f"{name}.queue.sqlite3")


def parse_broker_url(url: object, base_dir: str | None = None) -> BrokerURL:
    """Check a broker URL; ConfigError with one line naming what is wrong.

    `sqlite://REL` (two slashes) is relative to `base_dir` (a config file's folder) or the current folder.
    """
    if not isinstance(url, str) or not url:
        raise ConfigError(f"broker {url!r}: expected a URL such as sqlite:///PATH or redis://HOST:PORT/DB")
    if "\0" in url or any(ch.isspace() for ch in url):
        raise ConfigError(f"broker {url!r}: a URL has no spaces or NUL characters")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"broker {url!r}: expected SCHEME://..., with sqlite or redis as the scheme")
    scheme = scheme.lower()
    if scheme == "sqlite":
        return _sqlite_url(url, rest, base_dir)
    if scheme in ("redis", "rediss"):
        return _redis_url(url, scheme)
    raise ConfigError(f"broker {url!r}: unknown scheme {scheme!r} (expected sqlite or redis)")


def _sqlite_url(url: str, rest: str, base_dir: str | None) -> BrokerURL:
    if "?" in rest or "#" in rest:
        raise ConfigError(f"broker {url!r}: a sqlite URL takes no ?query or #fragment")
    path = rest if rest.startswith("/") else os.path.join(base_dir or os.getcwd(), rest)
    if not rest or rest.endswith("/"):
        raise ConfigError(f"broker {url!r}: expected a database file, as in sqlite:///abs/path/queue.sqlite3")
    path = os.path.normpath(path)
    return BrokerURL("sqlite", "sqlite://" + path, path=path)


def _redis_url(url: str, scheme: str) -> BrokerURL:
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number or out of range
        raise ConfigError(f"broker {url!r}: {exc}") from None
    if not host:
        raise ConfigError(f"broker {url!r}: expected a host, as in redis://127.0.0.1:6379/0")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and int(path) < 1 << 16):
        raise ConfigError(f"broker {url!r}: the database after the host is a number, as in /0")
    if parts.query or parts.fragment:
        raise ConfigError(f"broker {url!r}: a redis URL takes no ?query or #fragment here")
    return BrokerURL(scheme, url, host=host, port=port or 6379, db=int(path or 0))


def open_broker(url: str, base_dir: str | None = None, *, retry_for: float | None = None) -> Broker:
    """A broker for a URL (the connection opens on first use, in the process that uses it).
    `retry_for`: seconds a lost Redis connection is retried before an operation fails (0: at once)."""
    parsed = parse_broker_url(url, base_dir)
    if parsed.scheme == "sqlite":
        from .sqlite_broker import SQLiteBroker

        return SQLiteBroker(parsed.path or "")
    from .redis_broker import RedisBroker

    return RedisBroker(parsed.url) if retry_for is None else RedisBroker(parsed.url, retry_for=retry_for)
