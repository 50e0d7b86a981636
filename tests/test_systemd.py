"""systemd integration: the test plays systemd's side of sd_notify on a Unix datagram socket.

Each datagram is received with the sender's credentials (SO_PASSCRED), as systemd
does for NotifyAccess=main: every message must come from the master itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import open_tasks, record_task, records_of, wait_started
from helpers import TPROCESS, Instance, gone, instance_procs, wait_for, zombie_children

from tprocess import notify

JOBS_EXTRA = '''

def slow_setup(ctx):
    time.sleep(0.4)  # READY=1 must wait for every one of these
    record("setup")


def env_report(ctx):
    """What a worker sees, and what a program it execs sees in its /proc/PID/environ."""
    import subprocess
    exec_env = subprocess.run(["cat", "/proc/self/environ"], capture_output=True).stdout
    exec_names = {entry.split(b"=", 1)[0].decode() for entry in exec_env.split(b"\\0") if entry}
    names = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    worker = ",".join(sorted(names & set(os.environ))) or "-"
    execd = ",".join(sorted(names & exec_names)) or "-"
    record("env", worker, execd, "PATH" in exec_names)
    ctx.sleep(3600)


def idle(ctx):
    ctx.sleep(3600)


def orphaning(ctx):
    """Leave an orphan behind (double fork), as a careless task does: PID 1 must reap it."""
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            record("orphan")
            time.sleep(0.05)
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    ctx.sleep(0.2)
'''

CONFIG = '''
name = "ignored"
graceful_timeout = {graceful}

[groups.w]
task = "jobs.py:{task}"
workers = {workers}
setup = "jobs.py:slow_setup"
'''


@dataclass
class Datagram:
    at: float  # time.monotonic() at reception
    pid: int  # the sender, from SCM_CREDENTIALS
    fields: dict[str, str]


class FakeSystemd:
    """The service manager's end of NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET gives it: a path or "@abstract"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(notify.socket_address(address))
        self.received: list[Datagram] = []

    def receive(self, timeout: float) -> Datagram | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        lines = data.decode().splitlines()
        assert all("=" in line for line in lines), data
        message = Datagram(time.monotonic(), pid, dict(line.split("=", 1) for line in lines))
        self.received.append(message)
        return message

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> Datagram:
        """The first datagram (from now on) that carries key (=value)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message and key in message.fields and value in (None, message.fields[key]):
                return message
        raise AssertionError(f"no {key}={value or '...'} within {timeout}s; got {self.received}")

    def pending(self) -> list[Datagram]:
        """Whatever is queued now, without waiting."""
        self.sock.setblocking(False)
        queued = []
        try:
            while True:
                data = self.sock.recv(65536)
                queued.append(Datagram(time.monotonic(), -1, {"raw": data.decode()}))
        except BlockingIOError:
            return queued

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path):
    manager = FakeSystemd(str(tmp_path / "notify.sock"))
    yield manager
    manager.close()


@pytest.fixture
def abstract_systemd():
    manager = FakeSystemd(f"@tprocess-test-{uuid.uuid4().hex}")
    yield manager
    manager.close()


def start_notified(inst: Instance, manager: FakeSystemd, task: str = "idle", workers: int = 3,
                   graceful: float = 20, **env: str):
    records = record_task(inst, 1.0, extra=JOBS_EXTRA)
    inst.write("tprocess.toml", CONFIG.format(task=task, workers=workers, graceful=graceful))
    proc = inst.start_foreground("-c", "tprocess.toml", env={"NOTIFY_SOCKET": manager.address, **env})
    return proc, records


def finish(proc, timeout: float = 30) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ready_only_after_every_setup_with_a_readable_status(inst, systemd):
    proc, records = start_notified(inst, systemd)
    ready = systemd.wait_for("READY", "1")
    # the setups sleep, then record: all three were done before READY=1 was sent
    assert len(records_of(records, "setup")) == 3, systemd.received
    assert ready.fields["STATUS"] == "3 workers running"
    assert ready.pid == proc.pid  # the master (foreground: the command itself) sends, no worker

    assert inst.stop().returncode == 0
    stopping = systemd.wait_for("STOPPING", "1")
    assert stopping.fields["STATUS"].startswith("stopping (stop command)"), stopping
    finish(proc)
    assert all(m.pid == proc.pid for m in systemd.received), systemd.received
    assert [m for m in systemd.received if "READY" in m.fields] == [ready]


@pytest.mark.timeout(60)
def test_reload_sends_reloading_then_ready_once_the_roll_is_done(inst, systemd):
    proc, records = start_notified(inst, systemd, workers=2)
    systemd.wait_for("READY", "1")
    setups = len(records_of(records, "setup"))
    os.kill(proc.pid, signal.SIGHUP)  # systemctl reload, or ExecReload=tprocess reload
    reloading = systemd.wait_for("RELOADING", "1")
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0 and reloading.pid == proc.pid
    ready = systemd.wait_for("READY", "1")
    # READY=1 again only once both new workers are through their (slow) setup
    assert len(records_of(records, "setup")) == setups + 2, systemd.received
    assert ready.fields["STATUS"] == "2 workers running, generation 2", ready
    os.kill(proc.pid, signal.SIGTERM)
    systemd.wait_for("STOPPING", "1")
    finish(proc)


@pytest.mark.timeout(60)
def test_abstract_address_and_no_notify_variables_in_workers(inst, abstract_systemd):
    proc, records = start_notified(inst, abstract_systemd, task="env_report",
                                   WATCHDOG_USEC="60000000")
    abstract_systemd.wait_for("READY", "1")
    reports = wait_for(lambda: read_env_records(records) if len(read_env_records(records)) == 3
                       else None, 20, what="3 env reports")
    # no NOTIFY_SOCKET / WATCHDOG_* in a worker's os.environ, nor in what it execs (its
    # /proc/PID/environ); the rest of the environment (PATH) is passed on
    assert reports == [["-", "-", "True"]] * 3, reports
    os.kill(proc.pid, signal.SIGTERM)
    abstract_systemd.wait_for("STOPPING", "1")
    finish(proc)


def read_env_records(records: Path) -> list[list[str]]:
    lines = records.read_text().splitlines() if records.exists() else []
    return [line.split()[3:] for line in lines if line.startswith("env ")]


@pytest.mark.timeout(60)
def test_watchdog_pings_at_half_of_watchdog_usec(inst, systemd):
    proc, _ = start_notified(inst, systemd, workers=1, WATCHDOG_USEC="200000")
    first = systemd.wait_for("WATCHDOG", "1")
    window_end = first.at + 1.0
    while (remaining := window_end - time.monotonic()) > 0:
        systemd.receive(remaining)
    pings = [m for m in systemd.received if m.fields.get("WATCHDOG") == "1" and m.at <= window_end]
    # every 100 ms: about 10 in that second; a loaded machine may be late, never early
    assert 3 <= len(pings) <= 12, [round(m.at - first.at, 3) for m in pings]
    assert all(m.pid == proc.pid for m in pings)
    os.kill(proc.pid, signal.SIGTERM)
    finish(proc)


@pytest.mark.timeout(60)
def test_sigterm_with_a_busy_task_sends_stopping_and_extend_timeout(inst, systemd):
    proc, records = start_notified(inst, systemd, task="busy", workers=2, graceful=20)
    systemd.wait_for("READY", "1")
    wait_started(records, 1)
    os.kill(proc.pid, signal.SIGTERM)
    stopping = systemd.wait_for("STOPPING", "1")
    assert "waiting for 2 workers" in stopping.fields["STATUS"], stopping
    extend = systemd.wait_for("EXTEND_TIMEOUT_USEC", timeout=5)
    # the slowest group's graceful timeout (20 s) plus a margin, from now
    assert 20e6 <= int(extend.fields["EXTEND_TIMEOUT_USEC"]) <= (20 + notify.EXTEND_MARGIN + 1) * 1e6
    finish(proc)
    assert records_of(records, "start") and not open_tasks(records), "a task was cut"


@pytest.mark.timeout(60)
def test_daemon_does_not_notify_and_drops_the_variables(inst, systemd):
    records = record_task(inst, 1.0, extra=JOBS_EXTRA)
    inst.write("tprocess.toml", CONFIG.format(task="env_report", workers=2, graceful=20))
    result = inst.run("start", "-c", "tprocess.toml", "-d", "--log-file", str(inst.log),
                      env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000"})
    assert result.returncode == 0, (result.stderr, inst.read_log())
    # start -d returns once every worker is up: a READY=1 would be queued already
    reports = wait_for(lambda: read_env_records(records) if len(read_env_records(records)) == 2
                       else None, 20, what="2 env reports")
    assert reports == [["-", "-", "True"]] * 2, reports
    assert systemd.pending() == []
    assert inst.stop().returncode == 0
    assert systemd.pending() == []


def voluntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["daemon", "foreground-notify", "foreground-watchdog"])
def test_an_idle_master_wakes_only_for_the_watchdog(inst, systemd, mode):
    """Without a watchdog, an idle master sleeps in the kernel: its count of voluntary
    context switches stands still. With one, it wakes to ping (the measure can fail)."""
    record_task(inst, 1.0, extra=JOBS_EXTRA)
    if mode == "daemon":
        inst.start("jobs.py:idle", "-n", "2")
    else:
        env = {"NOTIFY_SOCKET": systemd.address}
        if mode == "foreground-watchdog":
            env["WATCHDOG_USEC"] = "200000"
        inst.start_foreground("jobs.py:idle", "-n", "2", env=env)
        systemd.wait_for("READY", "1")
    master = inst.master().pid
    inst.wait_workers(2)
    time.sleep(0.3)  # let start-up's last turns of the loop pass: nothing to wait for
    before = voluntary_switches(master)
    time.sleep(1.0)  # the measuring window itself
    woke = voluntary_switches(master) - before
    if mode == "foreground-watchdog":
        assert woke >= 3, woke
    else:
        assert woke == 0, woke
    os.kill(master, signal.SIGTERM)
    wait_for(lambda: gone(master), 20, what="the master to exit")
    wait_for(lambda: not instance_procs(inst.name), 20, what="the workers to exit")


# --- Docker: the master as PID 1 --------------------------------------------------------------


def can_make_pid_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.skipif(not can_make_pid_namespace(), reason="needs unshare and a new PID namespace (root)")
def test_master_as_pid_1_reaps_orphans_and_stops_gracefully(inst):
    """What `docker run` does without --init: the master is PID 1 of its own PID namespace."""
    records = record_task(inst, 1.0, extra=JOBS_EXTRA)
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
         TPROCESS, "start", "jobs.py:orphaning", "-n", "2", "--name", inst.name],
        cwd=inst.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    inst.foreground.append(proc)
    inst.wait_workers(2)
    master = inst.master()
    assert master.ppid == proc.pid  # unshare's child: PID 1 inside
    wait_for(lambda: len(records_of(records, "orphan")) >= 6, 20, what="orphans to come and go")
    wait_for(lambda: not zombie_children(master.pid), 10, what="the orphans to be reaped")
    os.kill(master.pid, signal.SIGTERM)  # docker stop, from outside the namespace
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"{inst.name}-master[1] INFO stopping (SIGTERM)" in err
    assert "left behind by a task" in err and "0 killed" in err, err
    assert not instance_procs(inst.name)


# --- the notifier on its own -------------------------------------------------------------------


def test_from_environment_removes_the_variables_and_reads_the_watchdog(systemd):
    env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    notifier = notify.Notifier.from_environment(environ=env)
    assert notifier is not None and notifier.watchdog_interval == 1.5
    assert env == {"OTHER": "kept"}
    notifier.status("two\nlines")
    notifier.reloading()
    assert systemd.receive(5).fields == {"STATUS": "two lines"}
    reloading = systemd.receive(5).fields
    assert reloading["RELOADING"] == "1"
    assert abs(int(reloading["MONOTONIC_USEC"]) / 1e6 - time.monotonic()) < 5
    notifier.close()


@pytest.mark.parametrize("env, has_notifier, interval", [
    ({"WATCHDOG_USEC": "200000"}, False, None),  # no socket: nothing to talk to
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, True, None),  # not ours
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"}, True, None),
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "0"}, True, None),
    ({"NOTIFY_SOCKET": "relative/path"}, False, None),
    ({"NOTIFY_SOCKET": "vsock:2:1234"}, False, None),
    ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "200000"}, True, 0.1),
])
def test_from_environment_refuses_what_is_not_for_us(env, has_notifier, interval):
    env = dict(env)
    notifier = notify.Notifier.from_environment(environ=env)
    assert (notifier is not None) == has_notifier
    assert env == {}
    if notifier is not None:
        assert notifier.watchdog_interval == interval
        assert (notifier.next_due() is not None) == (interval is not None)
        notifier.close()


def test_a_daemon_gets_no_notifier_but_loses_the_variables():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "200000"}
    assert notify.Notifier.from_environment(enabled=False, environ=env) is None
    assert env == {}


def test_a_long_stop_resends_extend_timeout_until_its_deadline(systemd):
    notifier = notify.Notifier(systemd.address)
    now = time.monotonic()
    notifier.begin_stop(now + 25, "stopping")
    assert systemd.receive(5).fields["STOPPING"] == "1"
    assert 29e6 < int(systemd.receive(5).fields["EXTEND_TIMEOUT_USEC"]) <= 30e6
    sent = []
    while notifier.next_due() is not None:  # run the timer on a simulated clock
        due = notifier.next_due()
        notifier.run_due(due)
        sent.append((due - now, int(systemd.receive(5).fields["EXTEND_TIMEOUT_USEC"]) / 1e6))
    # every message covers the rest of the stop plus the margin; none after the deadline
    assert [round(at) for at, _ in sent] == [10, 20], sent
    assert all(abs(at + extend - 30) < 0.5 for at, extend in sent), sent
    notifier.close()


def test_sending_to_a_vanished_manager_is_ignored(tmp_path):
    manager = FakeSystemd(str(tmp_path / "gone.sock"))
    notifier = notify.Notifier(manager.address)
    manager.close()
    os.unlink(manager.address)
    assert notifier.send("READY=1") is False  # and no exception: systemd gone is not our problem
    notifier.close()
