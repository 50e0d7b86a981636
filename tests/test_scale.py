"""Scaling a running pool: `tprocess scale`, SIGTTIN and SIGTTOU."""

from __future__ import annotations

import os
import signal

import pytest
from e2e_support import open_tasks, record_task, status_json, wait_started
from helpers import pids, wait_for, workers_of

TWO_GROUPS = '''
name = "{name}"
max_workers = 6
[groups.ip]
task = "jobs.py:busy"
workers = 2
[groups.domain]
task = "jobs.py:busy"
workers = 1
'''


def titles(inst, *indexes, group=""):
    prefix = f"{inst.name}-{group}-" if group else f"{inst.name}-"
    return sorted(f"{prefix}{i}" for i in indexes)


@pytest.mark.timeout(60)
def test_scale_up_and_down_keeps_names_and_cuts_no_task(inst):
    records = record_task(inst, 0.4)
    inst.start("jobs.py:busy", "-n", "2")
    master = inst.master()
    inst.wait_workers(2)

    up = inst.run("scale", "5")
    assert up.returncode == 0, (up.stdout, up.stderr)
    assert "2 -> 5" in up.stdout
    workers = inst.wait_workers(5)
    assert sorted(workers) == titles(inst, 0, 1, 2, 3, 4)
    status = status_json(inst)
    assert status["groups"][0]["workers"] == 5
    assert all(w["state"] in ("busy", "idle") for w in status["workers"])  # up means through setup

    doomed = {workers[t].pid for t in titles(inst, 3, 4)}
    wait_started(records, doomed)  # they are in the middle of a task
    down = inst.run("scale", "-2")
    assert down.returncode == 0, down.stderr
    assert sorted(workers_of(inst.name, master.pid)) == titles(inst, 0, 1, 2)  # gone when scale returns
    assert not [t for t in open_tasks(records) if t[0] in doomed], "scale-down cut a task"
    assert status_json(inst)["groups"][0]["restarts"]["scale"] == 5

    again = inst.run("scale", "+1")
    assert again.returncode == 0, again.stderr
    assert sorted(inst.wait_workers(4)) == titles(inst, 0, 1, 2, 3)
    assert inst.master().pid == master.pid
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_scale_mistakes_are_one_line_and_leave_the_pool_alone(inst):
    record_task(inst, 0.05)
    inst.write("tprocess.toml", TWO_GROUPS.format(name=inst.name))
    inst.start("-c", "tprocess.toml")
    before = inst.wait_workers(3)
    cases = [
        (("scale", "3"), 2, "name a group"),
        (("scale", "web", "3"), 2, "no group 'web'"),
        (("scale", "ip", "-5"), 2, "would make -3"),
        (("scale", "ip", "9"), 2, "max_workers (6)"),
        (("scale", "ip", "abc"), 2, ""),
        (("scale", "ip", "1.5"), 2, ""),
        (("scale", "ip", "+0"), 2, ""),
    ]
    for args, code, words in cases:
        result = inst.run(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("tprocess: error: "), (args, lines)
        assert words in lines[0], (args, lines)
    assert pids(inst.wait_workers(3)) == pids(before)
    ok = inst.run("scale", "domain", "0")
    assert ok.returncode == 0, ok.stderr
    assert sorted(inst.wait_workers(2)) == titles(inst, 0, 1, group="ip")
    assert [g["workers"] for g in status_json(inst)["groups"]] == [2, 0]
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_sigttin_and_sigttou_add_and_remove_a_worker_of_the_first_group(inst):
    record_task(inst, 0.05)
    inst.start("jobs.py:busy", "-n", "2")
    master = inst.master()
    inst.wait_workers(2)
    os.kill(master.pid, signal.SIGTTIN)
    assert sorted(inst.wait_workers(3)) == titles(inst, 0, 1, 2)
    wait_for(lambda: status_json(inst)["groups"][0]["workers"] == 3, 10, what="the scale to end")
    os.kill(master.pid, signal.SIGTTOU)
    wait_for(lambda: sorted(workers_of(inst.name, master.pid)) == titles(inst, 0, 1), 10,
             what="worker 2 to go")
    assert status_json(inst)["groups"][0]["workers"] == 2
    assert inst.stop().returncode == 0


def test_scale_of_an_instance_not_running_is_an_error(inst):
    result = inst.run("scale", "3")
    assert result.returncode == 1
    assert result.stderr.strip() == f"tprocess: error: tprocess {inst.name!r} is not running"


@pytest.mark.timeout(60)
def test_scale_up_whose_new_workers_fail_in_setup_says_so(inst):
    inst.write("jobs.py", '''
import os

def setup(ctx):
    if ctx.index >= 1:
        raise RuntimeError("no room for worker %d" % ctx.index)

def work(ctx):
    ctx.sleep(3600)
''')
    inst.write("tprocess.toml", f'name = "{inst.name}"\nmin_uptime = 0\n[groups.g]\ntask = "jobs.py:work"\n'
                                'setup = "jobs.py:setup"\nworkers = 1\n')
    inst.start("-c", "tprocess.toml")
    inst.wait_workers(1)
    result = inst.run("scale", "2")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "no room for worker 1" in result.stderr
    assert inst.stop().returncode == 0
