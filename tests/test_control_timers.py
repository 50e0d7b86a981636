"""The control server's request time-out must not wake an idle master once the request is in.

Every connection gets a REQUEST_TIMEOUT timer (a silent client is dropped); a timer left
armed after the request arrived woke the master 5 s after every `status` (bench/ops.py,
idle master). Checked on a real Server with the master's own Timers and a real socket.
"""

from __future__ import annotations

import selectors
import socket
import time
import uuid

import pytest

from tprocess import control
from tprocess.timers import Timers


@pytest.fixture
def server():
    listener = control.bind(f"ctltest-{uuid.uuid4().hex[:8]}")
    control.listen(listener)
    selector = selectors.DefaultSelector()
    timers = Timers()
    answered: list[dict] = []

    def status(conn: socket.socket, request: dict) -> None:
        answered.append(request)
        control.reply(conn, {"ok": True})

    srv = control.Server(listener, selector, {"status": status}, timers.call_later)
    yield srv, selector, timers, listener, answered
    selector.close()
    listener.close()


def serve_until(selector: selectors.BaseSelector, done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the server did not get there in time"
        for key, _ in selector.select(0.05):
            key.data(key.fileobj)


def test_an_answered_request_leaves_no_timer_armed(server):
    srv, selector, timers, listener, answered = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(listener.getsockname())
        serve_until(selector, lambda: srv.pending)
        assert timers.timeout() is not None  # a silent client would be dropped in time
        control.send(client, {"cmd": "status"})
        serve_until(selector, lambda: answered)
        assert control.receive(client) == {"ok": True}
    assert not srv.pending and not srv.expiry
    assert timers.timeout() is None  # nothing left to wake the master


def test_a_dropped_client_leaves_no_timer_armed(server):
    srv, selector, timers, listener, answered = server
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(listener.getsockname())
    serve_until(selector, lambda: srv.pending)
    client.close()  # hangs up without a request
    serve_until(selector, lambda: not srv.pending)
    assert not answered and not srv.expiry
    assert timers.timeout() is None
