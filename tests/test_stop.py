"""Graceful stop: no task is cut, deadlines tell the truth, every stop signal works."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from e2e_support import (
    open_tasks,
    read_records,
    record_task,
    records_of,
    wait_started,
)
from helpers import TPROCESS, gone, instance_procs, wait_for, workers_of


def cut_line(output: str, title: str, pid: int) -> str | None:
    """The line of stop's output saying this worker was cut in the middle of a task."""
    for line in output.splitlines():
        if f"{title} (pid {pid})" in line and ("cut" in line or "mid-task" in line):
            return line
    return None


def assert_no_task_cut(records):
    assert records_of(records, "start"), "no task ever started"
    assert not open_tasks(records), read_records(records)


@pytest.mark.timeout(60)
def test_stop_during_busy_tasks_cuts_none(inst):
    records = record_task(inst, 1.5)
    inst.start("jobs.py:busy", "-n", "3")
    workers = inst.wait_workers(3)
    wait_started(records, {w.pid for w in workers.values()})
    assert open_tasks(records), "the stop must come while tasks are running"

    began = time.monotonic()
    result = inst.stop()
    took = time.monotonic() - began
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "cut" not in result.stderr and "killed" not in result.stderr
    assert_no_task_cut(records)
    # the workers were mid-task and finished them: the stop waited for the work
    assert 0.2 < took < 15, took
    assert not instance_procs(inst.name)
    for w in workers.values():
        assert f"({w.pid})" in result.stdout.replace("pid ", "")


@pytest.mark.timeout(60)
def test_stop_timeout_kills_stragglers_and_says_so(inst):
    records = record_task(inst, 30)
    inst.start("jobs.py:busy", "-n", "2")
    workers = inst.wait_workers(2)
    wait_started(records, {w.pid for w in workers.values()})

    began = time.monotonic()
    result = inst.stop("--timeout", "0.5")
    took = time.monotonic() - began
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert took < 10, took
    log = inst.read_log()
    for title, w in workers.items():
        assert cut_line(result.stderr, title, w.pid), result.stderr
        assert f"killing {title} (pid {w.pid}) in the middle of a task" in log
        assert gone(w.pid)
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])
def test_stop_signal_to_master_is_graceful(inst, sig):
    records = record_task(inst, 1.0)
    inst.start("jobs.py:busy", "-n", "2")
    master = inst.master()
    workers = inst.wait_workers(2)
    wait_started(records, {w.pid for w in workers.values()})

    os.kill(master.pid, sig)
    wait_for(lambda: gone(master.pid), 15, what="the master to exit")
    wait_for(lambda: all(gone(w.pid) for w in workers.values()), 5, what="the workers to exit")
    assert_no_task_cut(records)
    log = inst.read_log()
    assert f"stopping ({sig.name})" in log
    assert "in the middle of a task" not in log
    assert "stopped: 2 workers exited, 0 killed" in log
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
def test_second_sigterm_stops_now(inst):
    records = record_task(inst, 30)
    inst.start("jobs.py:busy", "-n", "2")
    master = inst.master()
    workers = inst.wait_workers(2)
    wait_started(records, {w.pid for w in workers.values()})

    os.kill(master.pid, signal.SIGTERM)
    wait_for(lambda: "stopping (SIGTERM)" in inst.read_log(), 5, what="the first SIGTERM")
    began = time.monotonic()
    os.kill(master.pid, signal.SIGTERM)
    wait_for(lambda: gone(master.pid), 10, what="the master to exit after a second SIGTERM")
    assert time.monotonic() - began < 10
    log = inst.read_log()
    assert "SIGTERM again: stopping now" in log
    for title, w in workers.items():
        assert gone(w.pid)
        assert f"killing {title} (pid {w.pid}) in the middle of a task" in log
        assert f"worker {title} (pid {w.pid}) was killed by SIGKILL" in log
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_signalled_directly_finishes_task_and_is_replaced(inst, sig):
    records = record_task(inst, 1.5)
    inst.start("jobs.py:busy", "-n", "2")
    master = inst.master()
    workers = inst.wait_workers(2)
    victim = workers[f"{inst.name}-0"]
    wait_started(records, {victim.pid})
    assert (victim.pid, 1) in open_tasks(records), "the signal must arrive mid-task"

    os.kill(victim.pid, sig)

    def replaced():
        w = workers_of(inst.name, master.pid).get(f"{inst.name}-0")
        return w if w and w.pid != victim.pid else None

    new = wait_for(replaced, 10, what="a replacement for worker 0")
    assert new.ppid == master.pid
    # the old worker finished the task it was in, and did not start another one
    assert (victim.pid, 1) in records_of(records, "end")
    assert (victim.pid, 2) not in records_of(records, "start")
    inst.wait_log(f"worker {inst.name}-0 (pid {victim.pid}) exited with code 0")
    assert inst.master().pid == master.pid
    assert workers_of(inst.name, master.pid)[f"{inst.name}-1"].pid == workers[f"{inst.name}-1"].pid
    assert inst.stop().returncode == 0
    assert_no_task_cut(records)


@pytest.mark.timeout(60)
def test_foreground_ctrl_c_to_the_process_group(inst):
    records = record_task(inst, 1.5)
    proc = subprocess.Popen(
        [TPROCESS, "start", "jobs.py:busy", "-n", "3", "--name", inst.name],
        cwd=inst.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    inst.foreground.append(proc)
    workers = inst.wait_workers(3)
    master = inst.master()
    assert master.pid == proc.pid  # foreground: the command is the master
    wait_started(records, {w.pid for w in workers.values()})
    pgid = os.getpgid(proc.pid)
    assert pgid == proc.pid and pgid != os.getpgid(0)

    os.killpg(pgid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert_no_task_cut(records)
    assert "stopping (SIGINT)" in err
    assert "in the middle of a task" not in err
    assert not instance_procs(inst.name)


STOP_AWARE = '''

def sleeper(ctx):
    record("sleeping")
    woke = ctx.sleep(3600)
    record("woke", woke, ctx.stopping)


def looper(ctx):
    record("looping")
    while not ctx.stopping:
        time.sleep(0.02)
    record("saw-stopping")
'''

STOP_AWARE_CONFIG = '''
name = "{name}"
graceful_timeout = 30

[groups.sleep]
task = "jobs.py:sleeper"

[groups.loop]
task = "jobs.py:looper"
'''


@pytest.mark.timeout(60)
def test_ctx_sleep_returns_false_and_ctx_stopping_is_seen(inst):
    records = record_task(inst, 0, extra=STOP_AWARE)
    config = inst.write("tprocess.toml", STOP_AWARE_CONFIG.format(name=inst.name))
    inst.start("-c", str(config))
    workers = inst.wait_workers(2)
    wait_for(lambda: {r[0] for r in read_records(records)} >= {"sleeping", "looping"}, 10,
             what="both tasks to begin")

    began = time.monotonic()
    result = inst.stop()
    took = time.monotonic() - began
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert took < 10, took  # neither the hour of sleep nor the endless loop held the stop
    rows = read_records(records)
    sleeper = workers[f"{inst.name}-sleep-0"].pid
    looper = workers[f"{inst.name}-loop-0"].pid
    assert ["woke", str(sleeper), "0", "False", "True"] in rows, rows
    assert ["saw-stopping", str(looper), "0"] in rows, rows
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_whole_group_with_idle_workers_respawns_nothing(inst, sig):
    """Ctrl-C (SIGINT) or systemd's KillMode=control-group (SIGTERM) reach every process at once:
    idle workers exit at once, and the master must not take that for a death to repair."""
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(3600)\n")
    proc = subprocess.Popen(
        [TPROCESS, "start", "jobs.py:work", "-n", "4", "--name", inst.name],
        cwd=inst.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    inst.foreground.append(proc)
    workers = inst.wait_workers(4)
    wait_for(lambda: [w["state"] for w in json.loads(inst.run("status", "--json").stdout)["workers"]]
             == ["idle"] * 4, 10, what="4 idle workers")
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    exited = {int(pid) for pid in re.findall(r"worker \S+ \(pid (\d+)\) exited", err)}
    assert exited == {w.pid for w in workers.values()}, err
    assert not instance_procs(inst.name)


def test_stop_of_a_large_pool_prints_one_short_line(inst):
    """2,000 workers must not make a 90 KB line: stop names the first 20, counts the rest;
    the log has a line for every worker's exit."""
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(60)\n")
    inst.start("jobs.py:work", "-n", "25")
    workers = inst.wait_workers(25)
    stopped = inst.stop()
    assert stopped.returncode == 0, stopped.stderr
    line = stopped.stdout.strip()
    assert line.startswith(f"stopped {inst.name}-master") and "and 25 workers: " in line, line
    assert len(re.findall(r"\(pid \d+\)", line)) == 1 + 20, line
    assert line.endswith("and 5 more (each named in the log)"), line
    log = inst.read_log()
    assert all(f"worker {title} (pid {w.pid}) exited" in log for title, w in workers.items())
