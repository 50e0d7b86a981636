"""The control channel: an abstract Unix socket owned by the master.

The socket name (`\\0tprocess:UID:NAME`) is the instance's lock: binding it is
atomic, so two `start`s at the same moment end with one master, and the kernel
frees it when the master dies, so nothing goes stale after a `kill -9`. No file
is created. Clients learn the master's pid from the kernel (SO_PEERCRED), and
only the same user (or root) is served.

Protocol: the client sends one JSON object and a newline; the master answers
with one JSON object and closes. `status` is answered at once; `stop` when the
instance has stopped.
"""

from __future__ import annotations

import _socket  # the C module under socket.py: a client needs none of its enums (below)
import os
import sys

TYPE_CHECKING = False  # typing costs milliseconds on every `stop` and `status`
if TYPE_CHECKING:
    import selectors
    from collections.abc import Callable
    from typing import Any

    Handler = Callable[[_socket.socket, dict[str, Any]], None]

MAX_REQUEST = 4096
JSON_SPACE = " \t\n\r"  # the whitespace JSON allows between tokens
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request
MAX_PENDING = 64  # connections still sending; past that the oldest is dropped


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(pid)
        self.pid = pid


class NotRunning(Exception):
    pass


def address(name: str) -> str:
    return f"\0tprocess:{os.getuid()}:{name}"


def bind(name: str) -> _socket.socket:
    """Take the instance's lock by binding its socket; raise AlreadyRunning.

    Binding alone holds the name; the master calls listen() once it runs, so that
    SO_PEERCRED names the master and not the command that detached it.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.bind(address(name))
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            raise AlreadyRunning(_holder_pid(name)) from None
        raise
    return sock


def listen(sock: _socket.socket) -> None:
    """Called by the master itself: SO_PEERCRED names the process that listened."""
    sock.listen(128)
    sock.setblocking(False)


def _holder_pid(name: str) -> int | None:
    try:
        with connect(name, timeout=2.0) as sock:
            return peer_pid(sock)
    except (NotRunning, OSError):
        return None


def peer_pid(sock: _socket.socket | Connection) -> int:
    return _peer_credentials(sock)[0]


def peer_uid(sock: _socket.socket | Connection) -> int:
    return _peer_credentials(sock)[1]


def _peer_credentials(sock: _socket.socket | Connection) -> tuple[int, int]:
    """(pid, uid) of the process at the other end: SO_PEERCRED's struct ucred (three ints)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return (int.from_bytes(creds[0:4], sys.byteorder, signed=True),
            int.from_bytes(creds[4:8], sys.byteorder))


class Connection(_socket.socket):
    """A client's connection: the C socket type, which `with` closes.

    Not socket.socket, here nor in the master: importing socket.py builds its enums (with
    `enum`, ~7 ms of each `stop` and `status`; ~0.2 MiB of the master that every worker
    inherits: issue 8), and neither side uses what it adds."""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(name: str, timeout: float = 5.0) -> Connection:
    sock = Connection(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(address(name))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        raise NotRunning(name) from None
    except OSError:
        sock.close()
        raise
    return sock


def send(sock: _socket.socket | Connection, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def encode(message: dict[str, Any]) -> bytes:
    """One JSON line. A message of plain strings, numbers and nulls (a request of `stop` or
    `status`) is written here, anything else by json: json imports `re` and `enum` (~7 ms),
    and a `stop` has nothing else to do before the master has its request."""
    fields = []
    for key, value in message.items():
        text = _plain_json(value)
        if text is None or not _plain_string(key):
            import json

            return json.dumps(message).encode() + b"\n"
        fields.append(f'"{key}": {text}')
    return ("{" + ", ".join(fields) + "}\n").encode()


def _plain_json(value: Any) -> str | None:
    """value as JSON if it is a None, bool, int, finite float or plain string, else None."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if type(value) is int or type(value) is float and value - value == 0:  # not NaN, not inf
        return repr(value)
    if type(value) is str and _plain_string(value):
        return f'"{value}"'
    return None


def _plain_string(text: str) -> bool:
    """Printable ASCII with no quote or backslash: its JSON is itself in quotes."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def receive(sock: _socket.socket) -> dict[str, Any]:
    """Read one JSON reply until the master closes the connection."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    if not chunks:
        raise ConnectionError("the master closed the connection without answering")
    return decode(b"".join(chunks))


class _ScannerSettings:
    """What the C scanner of json reads from json's own decoder: its defaults."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def decode(data: bytes) -> Any:
    """json.loads(data), read by the C scanner under json: importing json imports `re` and
    `enum` (~9 ms of a `stop` or `status`, once their reply is in: issue 8). Without the C
    scanner, for text that is not UTF-8 and for malformed text (json's error says what is
    wrong), json.loads itself."""
    try:
        from _json import make_scanner

        text = data.decode()
        value, end = make_scanner(_ScannerSettings)(text, len(text) - len(text.lstrip(JSON_SPACE)))
        if not text[end:].strip(JSON_SPACE):
            return value
    except (ImportError, StopIteration, ValueError):
        pass
    import json

    return json.loads(data)


def request(name: str, message: dict[str, Any], timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Send one request to the running master; return (master pid, reply)."""
    with connect(name, timeout) as sock:
        pid = peer_pid(sock)
        send(sock, message)
        return pid, receive(sock)


def trusted(sock: _socket.socket) -> bool:
    """Serve only our own user, or root."""
    return peer_uid(sock) in (os.getuid(), 0)


# --- the master's end ---------------------------------------------------------------


class Server:
    """Serves requests from the master's selector without ever blocking its loop.

    A handler gets the connection and the request; it answers with `reply`, now or
    later (a stop is answered once the instance has stopped).
    """

    def __init__(self, listener: _socket.socket, selector: selectors.BaseSelector,
                 handlers: dict[str, Handler], call_later: Callable[..., Any]) -> None:
        self.selector = selector
        self.handlers = handlers
        self.call_later = call_later
        self.pending: dict[_socket.socket, bytes] = {}  # requests still arriving, oldest first
        self.expiry: dict[_socket.socket, Any] = {}  # their time-outs, cancelled once answered
        from selectors import EVENT_READ  # here: only the master serves, and a client need not import it

        self.readable = EVENT_READ
        selector.register(listener, EVENT_READ, self._on_accept)

    @staticmethod
    def load_codec() -> None:
        """Import json (~2 ms in the master) before the first request needs it."""
        import json  # noqa: F401

    def _on_accept(self, listener: _socket.socket) -> None:
        try:
            conn = accept(listener)
        except BlockingIOError:
            return
        if not trusted(conn):
            conn.close()
            return
        if len(self.pending) >= MAX_PENDING:  # a flood of silent clients must not exhaust our fds
            self._drop(next(iter(self.pending)))
        conn.setblocking(False)
        self.pending[conn] = b""
        self.selector.register(conn, self.readable, self._on_readable)
        self.expiry[conn] = self.call_later(REQUEST_TIMEOUT, self._expire, conn)

    def _expire(self, conn: _socket.socket) -> None:
        if conn in self.pending:
            self._drop(conn)

    def _drop(self, conn: _socket.socket) -> None:
        self._forget(conn)
        conn.close()

    def _forget(self, conn: _socket.socket) -> None:
        """No longer waiting for this request: an idle master must not wake for its time-out."""
        del self.pending[conn]
        self.expiry.pop(conn).cancel()
        self.selector.unregister(conn)

    def _on_readable(self, conn: _socket.socket) -> None:
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffered = self.pending[conn] + data
        if not data or len(buffered) > MAX_REQUEST and b"\n" not in buffered[:MAX_REQUEST]:
            self._drop(conn)
            return
        if b"\n" not in buffered:
            self.pending[conn] = buffered
            return
        self._forget(conn)
        self._dispatch(conn, buffered.split(b"\n", 1)[0])

    def _dispatch(self, conn: _socket.socket, line: bytes) -> None:
        try:
            request = decode(line)
        except ValueError:  # malformed JSON, or not UTF-8
            request = None
        command = request.get("cmd") if isinstance(request, dict) else None
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            reply(conn, {"error": f"unknown request {line[:80]!r}", "code": 2})
        else:
            handler(conn, request)


def accept(listener: _socket.socket) -> _socket.socket:
    """A new connection (close-on-exec), as socket.socket.accept makes it from the C type's
    own `_accept`, which returns the descriptor."""
    fd, _ = listener._accept()  # type: ignore[attr-defined]
    return _socket.socket(fileno=fd)


def reply(conn: _socket.socket, message: dict[str, Any]) -> None:
    """Answer and close; a client that went away is not our problem."""
    try:
        conn.settimeout(2.0)
        send(conn, message)
    except OSError:
        pass
    finally:
        conn.close()
