"""Where the metrics process listens: parse the `metrics` setting, show it, check it.

Accepted: an integer port, "PORT", ":PORT", "HOST:PORT", "[IPV6]:PORT". The host
defaults to 127.0.0.1 (loopback: metrics are not published unless asked). Port 0
("any free port") is refused: nobody, Prometheus included, could find it.

Nothing here imports prometheus_client: `start` checks that it is installed with
importlib only, and the master never imports it.
"""

from __future__ import annotations

import re

from .config import ConfigError, _show

TYPE_CHECKING = False  # typing costs 1.7 MiB in the master (issue 8): annotations only
if TYPE_CHECKING:
    from typing import Any

DEFAULT_HOST = "127.0.0.1"
INSTALL_HINT = "pip install 'tprocess[metrics]'"

# compiled on first use (re caches them): only an instance with metrics needs them
_ADDRESS = r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]*)):(?P<port>[^:]*)"
_PORT = r"[0-9]{1,6}"  # at most 6 digits: int() of a huge string is slow or refused
_EXPECTED = "expected 'HOST:PORT', 'PORT', ':PORT', '[IPV6]:PORT' or a port number"


def parse_address(value: Any, where: str) -> tuple[str, int]:
    """(host, port) of a `metrics` setting; ConfigError naming `where` if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{where}: {_EXPECTED}, got {_show(value)}")
    if isinstance(value, int):
        return DEFAULT_HOST, _check_port(value, where)
    if re.fullmatch(_PORT, value):
        return DEFAULT_HOST, _check_port(int(value), where)
    found = re.fullmatch(_ADDRESS, value)
    if found is None:
        raise ConfigError(f"{where}: {_EXPECTED}, got {_show(value)}")
    if not re.fullmatch(_PORT, found["port"]):
        raise ConfigError(f"{where}: port {_show(found['port'])} is not a number from 1 to 65535")
    host = found["v6"] or found["host"] or DEFAULT_HOST
    if found["v6"] is not None:
        _check_ipv6(found["v6"], where)
    return host, _check_port(int(found["port"]), where)


def _check_port(port: int, where: str) -> int:
    if port == 0:
        raise ConfigError(f"{where}: port 0 (any free port) is not allowed: Prometheus could not find it; "
                          "give a port from 1 to 65535")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {_show(port)} is out of range; expected 1 to 65535")
    return port


def _check_ipv6(text: str, where: str) -> None:
    import ipaddress  # only for a bracketed address: the master need not hold it (issue 8)

    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        raise ConfigError(f"{where}: {_show(text)} in brackets is not an IPv6 address") from None


def show_address(host: str, port: int) -> str:
    """HOST:PORT as a user writes it, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_installed() -> None:
    """Metrics need prometheus_client; found with importlib, without importing it."""
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(f"metrics: the prometheus_client package is not installed; {INSTALL_HINT}")


def check_can_listen(host: str, port: int) -> None:
    """Bind and close at once, the way the HTTP server will bind: a port in use or a host
    that is not ours is one clear error before anything is forked."""
    import socket  # here: the master imports this module, and needs none of socket.py

    shown = show_address(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            sock.bind(sockaddr)
    except socket.gaierror as exc:
        raise ConfigError(f"metrics: cannot listen on {shown}: {exc.strerror}") from None
    except OSError as exc:
        raise ConfigError(f"metrics: cannot listen on {shown}: {exc.strerror or exc}") from None
