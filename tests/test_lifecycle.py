"""Start, titles, status, stop: the seed's scenario end to end."""

from __future__ import annotations

import json
import os
import signal
import time

from helpers import gone, instance_procs, pids, wait_for, workers_of

SLEEPER = """
def work(ctx):
    ctx.sleep(5)
"""


def test_start_titles_status_stop(inst):
    inst.write("jobs.py", SLEEPER)
    out = inst.start("jobs.py:work", "-n", "5")
    assert "started" in out.stdout
    master = inst.master()
    workers = workers_of(inst.name, master.pid)
    assert sorted(workers) == [f"{inst.name}-{i}" for i in range(5)]
    with open(f"/proc/{master.pid}/cmdline", "rb") as fh:
        assert fh.read().rstrip(b"\0") == f"{inst.name}-master".encode()

    status = inst.run("status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["master"]["pid"] == master.pid
    assert {w["name"]: w["pid"] for w in data["workers"]} == {t: p.pid for t, p in workers.items()}
    assert all(w["state"] in ("idle", "busy") for w in data["workers"])
    table = inst.run("status")
    assert table.returncode == 0 and f"{inst.name}-master" in table.stdout

    stopped = inst.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert f"{inst.name}-master (pid {master.pid})" in stopped.stdout
    assert not instance_procs(inst.name)
    assert inst.run("status").returncode == 3


def test_stop_when_not_running_says_so(inst):
    result = inst.stop()
    assert result.returncode == 0
    assert "not running" in result.stdout


def test_second_start_refused_and_pool_untouched(inst):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "2")
    before = inst.wait_workers(2)
    master = inst.master()
    again = inst.run("start", "jobs.py:work", "-n", "2", "-d")
    assert again.returncode == 1
    assert f"already running (master pid {master.pid})" in again.stderr
    assert pids(inst.wait_workers(2)) == pids(before)
    assert inst.stop().returncode == 0


def test_respawn_after_kill_keeps_name(inst):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "3")
    master = inst.master()
    victim = inst.wait_workers(3)[f"{inst.name}-1"]
    signal_pid(victim.pid, signal.SIGKILL)

    def replaced():
        w = workers_of(inst.name, master.pid).get(f"{inst.name}-1")
        return w if w and w.pid != victim.pid else None

    new = wait_for(replaced, 10, what="the replacement of worker 1")
    assert new.ppid == master.pid
    assert inst.master().pid == master.pid
    inst.wait_log("was killed by SIGKILL")
    inst.stop()


def test_idle_stop_does_not_wait_for_sleep(inst):
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(3600)\n")
    inst.start("jobs.py:work", "-n", "4")
    master = inst.master()
    began = time.monotonic()
    result = inst.stop(timeout=120)
    took = time.monotonic() - began
    assert result.returncode == 0
    assert gone(master.pid)
    # a ctx.sleep of an hour must not hold the stop: anything near the sleep would fail
    assert took < 60, took


def signal_pid(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def test_titles_for_ps_comm_pgrep_and_a_detached_session(tmp_path):
    """ps -o comm and pgrep -x see the titles (comm is cut at 15 characters, so use a short
    name); a detached master has no controlling terminal and its own session."""
    import subprocess
    import uuid

    from helpers import Instance

    inst = Instance(f"p{uuid.uuid4().hex[:4]}", tmp_path)  # 'pXXXX-master' fits in comm
    try:
        inst.write("jobs.py", SLEEPER)
        inst.start("jobs.py:work", "-n", "2")
        master = inst.master()
        comm = subprocess.run(["ps", "-o", "comm=", "-p", str(master.pid)],
                              capture_output=True, text=True).stdout.strip()
        assert comm == f"{inst.name}-master"
        found = subprocess.run(["pgrep", "-x", f"{inst.name}-1"], capture_output=True, text=True)
        assert [int(p) for p in found.stdout.split()] == [inst.wait_workers(2)[f"{inst.name}-1"].pid]
        with open(f"/proc/{master.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        session, tty = int(fields[3]), int(fields[4])
        assert tty == 0, "a detached master must have no controlling terminal"
        assert session != os.getsid(0)
        assert inst.stop().returncode == 0
    finally:
        inst.cleanup()
