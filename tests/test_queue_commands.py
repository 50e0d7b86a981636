"""`enqueue` and `queue stats|dead|retry|purge` through their argparse entry, against both brokers;
and the standard-input load as a real process (`python -m tprocess.queue`)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import pytest

from tprocess.queue import open_broker
from tprocess.queue.commands import add_queue_commands

pytestmark = pytest.mark.timeout(60)


def run(argv: list[str], monkeypatch, stdin: str = "") -> int:
    """Parse as the `tprocess` command line will (argparse subparsers) and run."""
    parser = argparse.ArgumentParser(prog="tprocess")
    add_queue_commands(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    args = parser.parse_args(argv)
    return args.func(args)


def test_enqueue_arguments_and_stdin_then_stats(broker_url, monkeypatch, capsys):
    assert run(["enqueue", "--broker", broker_url, "ip", '{"ip": "1.2.3.4"}', "[5]"], monkeypatch) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 2
    lines = "".join(json.dumps({"n": n}) + "\n" for n in range(25_000)) + "\n"  # a blank line is skipped
    assert run(["enqueue", "--broker", broker_url, "ip"], monkeypatch, stdin=lines) == 0
    assert "25000 jobs enqueued in queue ip" in capsys.readouterr().err
    assert run(["queue", "--broker", broker_url, "stats", "--json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["ip"]["waiting"] == 25_002
    assert run(["queue", "stats", "--broker", broker_url], monkeypatch) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["QUEUE", "WAITING", "DELAYED", "RUNNING", "DONE/MIN", "DEAD"]
    assert table[1].split() == ["ip", "25002", "0", "0", "0", "0"]
    broker = open_broker(broker_url)
    first = broker.fetch("ip", "c", 5, 30)
    assert (first.id, first.data) == (ids[0], {"ip": "1.2.3.4"})
    assert broker.fetch("ip", "c", 5, 30).data == [5]
    assert broker.fetch("ip", "c", 5, 30).data == {"n": 0}
    broker.close()


def test_dead_retry_and_purge(broker_url, monkeypatch, capsys):
    broker = open_broker(broker_url)
    ids = broker.put_many("ip", ["a", "b", "c"])
    broker.dead(broker.fetch("ip", "c", 5, 30), "Traceback (most recent call last):\nValueError: bad a")
    broker.dead(broker.fetch("ip", "c", 5, 30), "ValueError: bad b")
    assert run(["queue", "dead", "ip", "--broker", broker_url], monkeypatch) == 0
    out = capsys.readouterr().out
    assert ids[0] in out and "ValueError: bad a" in out and "2 dead jobs in queue ip" in out
    assert run(["queue", "--broker", broker_url, "retry", "ip", ids[1], "nope"], monkeypatch) == 1
    captured = capsys.readouterr()
    assert "1 dead jobs of queue ip back" in captured.out
    assert captured.err == "tprocess: error: queue ip: no dead job with id nope\n"
    assert run(["queue", "--broker", broker_url, "retry", "ip"], monkeypatch) == 0
    assert "1 dead jobs of queue ip back" in capsys.readouterr().out
    assert broker.stats("ip")["ip"]["waiting"] == 3
    assert run(["queue", "--broker", broker_url, "purge", "ip"], monkeypatch, stdin="n\n") == 1
    assert "not confirmed" in capsys.readouterr().err
    assert broker.stats("ip")["ip"]["waiting"] == 3
    assert run(["queue", "--broker", broker_url, "purge", "ip"], monkeypatch, stdin="y\n") == 0
    assert "3 jobs purged from queue ip" in capsys.readouterr().out
    broker.put("ip", 1)
    assert run(["queue", "--broker", broker_url, "purge", "ip", "--yes"], monkeypatch) == 0
    assert broker.stats("ip")["ip"]["waiting"] == 0
    broker.close()


@pytest.mark.parametrize("argv, stdin, message", [
    (["enqueue", "--broker", "redis://h:0x/0", "ip", "1"], "", "broker 'redis://h:0x/0'"),
    (["enqueue", "--broker", "BROKER", "a b", "1"], "", "queue name 'a b'"),
    (["enqueue", "--broker", "BROKER", "ip", "{nope"], "", "argument 1: not valid JSON"),
    (["enqueue", "--broker", "BROKER", "ip"], "1\n2\nNaN\n", "standard input line 3: not valid JSON"),
    (["enqueue", "--broker", "BROKER", "--delay", "-1", "ip", "1"], "", "--delay -1.0"),
])
def test_bad_input_is_one_line_and_exit_2(broker_url, monkeypatch, capsys, argv, stdin, message):
    argv = [broker_url if a == "BROKER" else a for a in argv]
    assert run(argv, monkeypatch, stdin=stdin) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tprocess: error: {message}") and err.count("\n") == 1, err


def test_config_file_broker_and_default_state_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "tprocess.toml").write_text('name = "crawl"\nbroker = "sqlite://data/q.sqlite3"\n'
                                            '[groups.ip]\ntask = "jobs.py:scan"\nqueue = "ip"\n')
    assert run(["enqueue", "-c", str(tmp_path / "tprocess.toml"), "ip", "1"], monkeypatch) != 0
    assert "does not exist" in capsys.readouterr().err  # relative to the file's folder, which lacks data/
    (tmp_path / "data").mkdir()
    assert run(["enqueue", "-c", str(tmp_path / "tprocess.toml"), "ip", "1"], monkeypatch) == 0
    assert (tmp_path / "data" / "q.sqlite3").exists()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert run(["enqueue", "--name", "crawl", "ip", "2"], monkeypatch) == 0
    assert (tmp_path / "state" / "tprocess" / "crawl.queue.sqlite3").exists()


def test_stdin_load_as_a_real_process(broker_url, tmp_path):
    """`cat jobs.jsonl | tprocess enqueue ip`, the real command."""
    from helpers import TPROCESS

    count = 100_000
    data = "".join(f'{{"ip": "10.0.{n // 256 % 256}.{n % 256}", "n": {n}}}\n' for n in range(count))
    done = subprocess.run([TPROCESS, "enqueue", "--broker", broker_url, "ip"],
                          input=data.encode(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    print(done.stderr.decode().strip())  # the measured rate, for the report
    broker = open_broker(broker_url)
    assert broker.stats("ip")["ip"]["waiting"] == count
    broker.close()
