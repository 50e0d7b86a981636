"""The master's death, leftovers, concurrent starts, and decoys that must never be signalled."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from e2e_support import open_tasks, record_task, records_of, status_json, wait_started
from helpers import (
    TPROCESS,
    gone,
    instance_procs,
    process_table,
    read_proc,
    wait_for,
    workers_of,
)

MIXED = '''
name = "{name}"

[groups.busy]
task = "jobs.py:busy"
workers = 2

[groups.idle]
task = "jobs.py:idle"
workers = 2
'''

IDLE_TASK = '''

def idle(ctx):
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_workers_finish_and_exit_when_the_master_is_killed(inst):
    records = record_task(inst, 1.5, extra=IDLE_TASK)
    config = inst.write("tprocess.toml", MIXED.format(name=inst.name))
    inst.start("-c", str(config))
    master = inst.master()
    workers = inst.wait_workers(4)
    busy = {w.pid for t, w in workers.items() if "-busy-" in t}
    wait_started(records, busy)

    os.kill(master.pid, signal.SIGKILL)
    began = time.monotonic()
    # everyone notices: idle workers leave their hour of ctx.sleep, busy ones finish the task
    wait_for(lambda: all(gone(w.pid) for w in workers.values()), 10,
             what="every worker to exit after the master's death")
    assert time.monotonic() - began < 10
    assert not open_tasks(records), "a task was cut when the master died"
    # a busy worker ended the task it was in and did not begin another
    for pid in busy:
        assert [n for p, n in records_of(records, "start") if p == pid] == [1]
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
def test_new_start_cleans_leftovers_of_a_killed_master(inst):
    records = record_task(inst, 2.5)
    inst.start("jobs.py:busy", "-n", "3")
    old_master = inst.master()
    old = inst.wait_workers(3)
    wait_started(records, {w.pid for w in old.values()})
    os.kill(old_master.pid, signal.SIGKILL)
    wait_for(lambda: gone(old_master.pid), 5, what="the old master to die")

    result = inst.start("jobs.py:busy", "-n", "3")
    assert "leftover" in result.stderr, (result.stdout, result.stderr)
    for w in old.values():
        assert f"(pid {w.pid})" in result.stderr
        assert gone(w.pid)
    new_master = inst.master()
    assert new_master.pid != old_master.pid
    new = inst.wait_workers(3)
    assert sorted(new) == sorted(old)
    assert not {w.pid for w in new.values()} & {w.pid for w in old.values()}
    # the leftovers were stopped gracefully: each ended its task before the new start went on
    assert not [t for t in open_tasks(records) if t[0] in {w.pid for w in old.values()}]
    assert "killed" not in result.stderr
    stopped = inst.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert not open_tasks(records)
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
def test_concurrent_starts_leave_exactly_one_master(inst):
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(3600)\n")
    argv = [TPROCESS, "start", "jobs.py:work", "-n", "2", "-d", "--name", inst.name,
            "--log-file", str(inst.log)]
    procs = [subprocess.Popen(argv, cwd=inst.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append((proc.returncode, out, err))
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    for code, _, err in losers:
        assert "already running" in err, (code, err)
    masters = [p for p in instance_procs(inst.name) if p.title == f"{inst.name}-master"]
    assert len(masters) == 1, masters
    pid = int(re.search(r"master pid (\d+)", winners[0][1]).group(1))
    assert masters[0].pid == pid
    assert sorted(inst.wait_workers(2)) == [f"{inst.name}-0", f"{inst.name}-1"]
    assert len(instance_procs(inst.name)) == 4  # the master, its output process, 2 workers
    assert inst.stop().returncode == 0
    assert not instance_procs(inst.name)


DECOY = '''
import os, signal, sys, time
import setproctitle

title, log = sys.argv[1], sys.argv[2]


def note(signum, frame):
    with open(log, "a") as fh:
        fh.write(f"{signum}\\n")


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP,
            signal.SIGQUIT, signal.SIGCONT):
    signal.signal(sig, note)
setproctitle.setproctitle(title)
open(log + ".ready", "w").close()
while True:
    time.sleep(1)
'''


def master_pid_of(result) -> int:
    return int(re.search(r"master pid (\d+)", result.stdout).group(1))


@pytest.mark.timeout(90)
def test_decoys_titled_like_the_instance_are_never_signalled(inst):
    script = inst.write("decoy.py", DECOY)
    decoys = {}
    try:
        for title in (f"{inst.name}-3", f"{inst.name}-master"):
            log = inst.dir / f"decoy-{title}.signals"
            proc = subprocess.Popen([sys.executable, str(script), title, str(log)])
            decoys[proc.pid] = (proc, log)
        for pid, (_, log) in decoys.items():
            wait_for(lambda log=log: os.path.exists(f"{log}.ready"), 10, what="decoys to be ready")
            assert read_proc(pid).title.startswith(inst.name + "-")

        # not running: status and stop see no leftovers
        status = inst.run("status")
        assert status.returncode == 3 and "leftover" not in status.stdout, status.stdout
        stop = inst.stop()
        assert stop.returncode == 0 and "not running" in stop.stdout, stop.stdout

        records = record_task(inst, 3.0, extra=IDLE_TASK)
        started = inst.start("jobs.py:busy", "-n", "4")
        assert "leftover" not in started.stderr
        master = master_pid_of(started)
        workers = wait_for(lambda: len(workers_of(inst.name, master)) == 4
                           and workers_of(inst.name, master), 10, what="4 workers")
        assert not set(decoys) & {w.pid for w in workers.values()}
        data = status_json(inst)
        assert data["master"]["pid"] == master
        assert not set(decoys) & {w["pid"] for w in data["workers"]}
        wait_started(records, {w.pid for w in workers.values()})

        # the master dies: leftover clean-up by status, stop and start must skip the decoys
        os.kill(master, signal.SIGKILL)
        wait_for(lambda: gone(master), 5, what="the master to die")
        status = inst.run("status")
        assert status.returncode == 3
        stop = inst.stop()
        assert stop.returncode == 0, (stop.stdout, stop.stderr)
        assert "leftover" in stop.stdout, stop.stdout
        for pid in decoys:
            for text in (status.stdout, stop.stdout, stop.stderr):
                assert f"pid {pid})" not in text
        again = inst.start("jobs.py:idle", "-n", "4")
        assert "leftover" not in again.stderr  # the stop above left nothing behind
        stop = inst.stop()
        assert stop.returncode == 0, (stop.stdout, stop.stderr)
        assert f"{inst.name}-master (pid {master_pid_of(again)})" in stop.stdout

        for pid, (proc, log) in decoys.items():
            assert proc.poll() is None, "a decoy died"
            assert read_proc(pid).state != "Z"
            assert not log.exists() or log.read_text() == "", f"decoy {pid} got signals"
        # only the decoys are left titled like the instance
        assert {p.pid for p in instance_procs(inst.name)} == set(decoys)
    finally:
        for proc, _ in decoys.values():
            proc.kill()
            proc.wait(timeout=10)


def test_decoys_do_not_count_as_a_running_master(inst):
    """A stranger titled PREFIX-master is not the instance: start works, stop finds it not."""
    script = inst.write("decoy.py", DECOY)
    log = inst.dir / "decoy.signals"
    proc = subprocess.Popen([sys.executable, str(script), f"{inst.name}-master", str(log)])
    try:
        wait_for(lambda: os.path.exists(f"{log}.ready"), 10, what="the decoy to be ready")
        inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(3600)\n")
        started = inst.start("jobs.py:work", "-n", "1")
        master = master_pid_of(started)
        assert master != proc.pid
        stopped = inst.stop()
        assert stopped.returncode == 0
        assert f"(pid {master})" in stopped.stdout and f"(pid {proc.pid})" not in stopped.stdout
        assert proc.poll() is None
        assert not log.exists()
        assert [p.pid for p in process_table() if p.title == f"{inst.name}-master"] == [proc.pid]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def start_then_kill_master(inst, workers: int = 2):
    """An instance whose workers are in a 30 s task when its master is killed."""
    records = record_task(inst, 30)
    inst.start("jobs.py:busy", "-n", str(workers))
    master = inst.master()
    old = inst.wait_workers(workers)
    wait_started(records, {w.pid for w in old.values()})
    os.kill(master.pid, signal.SIGKILL)
    wait_for(lambda: gone(master.pid), 5, what="the master to die")
    return old


@pytest.mark.timeout(60)
def test_start_kills_leftovers_that_outlast_the_graceful_timeout(inst):
    old = start_then_kill_master(inst)
    began = time.monotonic()
    result = inst.start("jobs.py:busy", "-n", "2", "--graceful-timeout", "0.5")
    assert time.monotonic() - began < 15
    for title, w in old.items():
        assert f"killed {title} (pid {w.pid})" in result.stderr, result.stderr
        assert gone(w.pid)
    new = inst.wait_workers(2)
    assert not {w.pid for w in new.values()} & {w.pid for w in old.values()}
    assert inst.stop("--timeout", "0.5").returncode == 1  # the new ones are in 30 s tasks too


@pytest.mark.timeout(60)
def test_stop_of_leftovers_with_timeout_kills_and_says_so(inst):
    old = start_then_kill_master(inst)
    result = inst.stop("--timeout", "0.5")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "leftover" in result.stdout
    for title, w in old.items():
        assert f"killed {title} (pid {w.pid})" in result.stderr, result.stderr
        assert gone(w.pid)
    assert not instance_procs(inst.name)
