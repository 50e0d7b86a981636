"""Fixtures of the queue tests: a real redis-server on a free loopback port, and `broker_url`
parametrized over both brokers so the same test functions run against SQLite and Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of our own: 127.0.0.1, a free port, a scratch folder; stopped by pid."""

    def __init__(self, folder: Path, port: int | None = None, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `bash tests/ensure_redis.sh` (or `make setup`)")
        self.binary, self.folder, self.persistent = binary, folder, persistent
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.persistent else "no", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited at start"
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False
        wait_for(answers, timeout=15, what=f"redis-server on port {self.port} to answer PING")
        client.close()
        return self

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown: with appendonly, data is kept), SIGKILL if it lingers."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    folder = Path(tempfile.mkdtemp(prefix="tprocess-redis-"))
    server = RedisServer(folder).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty broker of each kind."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/queue.sqlite3"
    import redis

    server: RedisServer = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(server.url) as client:
        client.flushall()
    return server.url
