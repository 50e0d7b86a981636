"""The control socket under hostile clients: garbled, oversized, half-sent, slowly sent
requests, silent connections. The master never crashes or stalls, the pool is untouched."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
from e2e_support import status_json
from helpers import pids, wait_for
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tprocess import control


def connect(inst) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(control.address(inst.name))
    return sock


def answer(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def pool(inst):
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(3600)\n")
    inst.start("jobs.py:work", "-n", "2")
    return inst.wait_workers(2)


@pytest.mark.timeout(60)
def test_garbled_and_unknown_requests_get_an_error_answer(inst, pool):
    for request in (b"hello\n", b"[1, 2]\n", b'{"cmd": 7}\n', b'{"cmd": "explode"}\n', b"\xff\xfe\n"):
        with connect(inst) as sock:
            sock.sendall(request)
            reply = json.loads(answer(sock))
        assert "unknown request" in reply["error"] and reply["code"] == 2, (request, reply)
    assert pids(inst.wait_workers(2)) == pids(pool)
    assert status_json(inst)["master"]["state"] == "running"
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_oversized_half_sent_and_slow_requests(inst, pool):
    with connect(inst) as sock:  # 64 KiB without a newline: dropped, not buffered forever
        try:
            sock.sendall(b"x" * 65536)
            dropped = answer(sock) == b""
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
        assert dropped
    with connect(inst) as sock:  # half a request, then gone
        sock.sendall(b'{"cmd": "sta')
    with connect(inst) as sock:  # a request sent a few bytes at a time still gets its answer
        for piece in (b'{"cmd"', b': "sta', b'tus"}', b"\n"):
            sock.sendall(piece)
            time.sleep(0.05)
        assert json.loads(answer(sock))["master"]["pid"] == inst.master().pid
    bad_scale = b'{"cmd": "scale", "group": null, "count": {"a": 1}}\n'
    with connect(inst) as sock:  # a well-formed request with nonsense in it
        sock.sendall(bad_scale)
        assert json.loads(answer(sock))["code"] == 2
    assert pids(inst.wait_workers(2)) == pids(pool)
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_silent_clients_neither_block_the_master_nor_pile_up(inst, pool):
    silent = [connect(inst) for _ in range(100)]  # more than the master keeps waiting
    try:
        began = time.monotonic()
        status = status_json(inst)  # answered while 100 connections say nothing
        assert time.monotonic() - began < 5
        assert status["master"]["state"] == "running"
        # the oldest were dropped to make room; the rest are dropped after the request timeout
        assert wait_for(lambda: all(_closed(s) for s in silent), control.REQUEST_TIMEOUT + 10,
                        what="the silent connections to be dropped")
    finally:
        for sock in silent:
            sock.close()
    fds = len(os.listdir(f"/proc/{inst.master().pid}/fd"))
    assert fds < 40, fds
    assert pids(inst.wait_workers(2)) == pids(pool)
    assert inst.stop().returncode == 0


def _closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
@example({"cmd": "stop", "timeout": None})
@example({"cmd": "stop", "timeout": 1e-07})
def test_requests_are_json_whoever_writes_them(message):
    """control.encode writes plain requests itself (no json import on a stop's path) and
    hands anything else to json: either way one line that json reads back as sent."""
    line = control.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == message


def _same(a, b):
    """Equal as JSON values, NaN included (json.dumps writes NaN as NaN on both sides)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _outcome(read, data):
    try:
        return "value", read(data)
    except ValueError as exc:  # json's errors, and bytes that are not UTF-8
        return "error", type(exc)


any_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
JSON_WORDS = ['{', '}', '[', ']', ',', ':', '"a"', '"\\u00e9"', '"\\ud800"', '"\\x"', '1', '-0', '1e5', '.5',
              '01', 'NaN', 'Infinity', '-Infinity', 'nan', 'true', 'null', 'tru', ' ', '\n', '\t', '\x0b',
              '\ufeff', '"\x01"', '1 2']


@settings(max_examples=700, deadline=None)
@given(any_values, st.sampled_from(["", " ", "\n", " \r\n\t"]), st.sampled_from(["", "\n", "  \n"]))
def test_replies_are_read_as_json_reads_them(value, before, after):
    """control.decode (json's C scanner, without importing json and re: ~9 ms of a `stop`)
    reads every JSON document as json.loads does, whitespace around it included."""
    data = (before + json.dumps(value) + after).encode()
    assert _same(control.decode(data), json.loads(data))


@settings(max_examples=700, deadline=None)
@given(st.lists(st.sampled_from(JSON_WORDS), max_size=7).map("".join), st.sampled_from(["utf-8", "utf-16"]))
@example('{"a": 1} x', "utf-8")
@example('\ufeff{}', "utf-8")
def test_malformed_replies_fail_as_json_fails(text, encoding):
    """Where json.loads refuses a text, decode refuses it too (with json's own error); where
    it reads one, decode reads the same value."""
    data = text.encode(encoding, errors="surrogatepass")
    ours, theirs = _outcome(control.decode, data), _outcome(json.loads, data)
    if theirs[0] == "error":
        assert ours[0] == "error"
    else:
        assert ours[0] == "value" and _same(ours[1], theirs[1]), (ours, theirs)
