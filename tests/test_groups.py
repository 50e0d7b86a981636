"""Groups from a TOML file: titles, --name, setup/teardown, -c for stop/status, timeouts."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from e2e_support import record_task, records_of, status_json, wait_started
from helpers import appended_lines, gone, instance_procs, master_of, wait_for, workers_of

SETUP_JOBS = '''
import os

RECORDS = {records!r}


def record(kind, ctx):
    line = f"{{kind}} {{os.getpid()}} {{os.getppid()}} {{ctx.name}}\\n"
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def setup(ctx):
    record("setup", ctx)


def teardown(ctx):
    record("teardown", ctx)


def work(ctx):
    record("task", ctx)
    ctx.sleep(3600)
'''

TWO_GROUPS = '''
name = "{name}"
graceful_timeout = 20

[groups.ip]
task = "{task}"
workers = 3
setup = "{setup}"
teardown = "{teardown}"

[groups.domain]
task = "{task}"
workers = 2
setup = "{setup}"
teardown = "{teardown}"
'''


def write_groups(inst, name: str, folder: str = "", task: str = "jobs.py:work",
                 setup: str = "jobs.py:setup", teardown: str = "jobs.py:teardown",
                 module_file: str = "jobs.py"):
    base = inst.dir / folder if folder else inst.dir
    base.mkdir(exist_ok=True)
    records = inst.dir / "records.txt"
    (base / module_file).write_text(SETUP_JOBS.format(records=str(records)))
    config = base / "tprocess.toml"
    config.write_text(TWO_GROUPS.format(name=name, task=task, setup=setup, teardown=teardown))
    return config, records


def read(records):
    return [line.split() for line in appended_lines(records)]


def expected_titles(name: str) -> list[str]:
    return sorted([f"{name}-ip-{i}" for i in range(3)] + [f"{name}-domain-{i}" for i in range(2)])


def test_two_groups_titles_and_setup_teardown_in_each_worker(inst):
    config, records = write_groups(inst, inst.name)
    inst.start("-c", str(config))
    master = inst.master()
    workers = workers_of(inst.name, master.pid)
    assert sorted(workers) == expected_titles(inst.name)
    assert all(w.ppid == master.pid for w in workers.values())
    pids = {w.pid: title for title, w in workers.items()}
    wait_for(lambda: len([r for r in read(records) if r[0] == "task"]) == 5, 10,
             what="one task record per worker")

    result = inst.stop()
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert not instance_procs(inst.name)

    rows = read(records)
    for kind in ("setup", "teardown"):
        done = [r for r in rows if r[0] == kind]
        # once in each worker: exactly the five worker pids, each once, none in the master
        assert Counter(int(r[1]) for r in done) == Counter(list(pids)), (kind, rows)
        for _, pid, ppid, title in done:
            assert int(ppid) == master.pid, (kind, "did not run in a child of the master", rows)
            assert pids[int(pid)] == title
    # after fork and before exit: in each worker, setup, then the task, then teardown
    for pid in pids:
        kinds = [r[0] for r in rows if int(r[1]) == pid]
        assert kinds == ["setup", "task", "teardown"], (pid, rows)


def test_name_flag_overrides_file_name(inst):
    file_name = f"{inst.name}-file"
    config, _ = write_groups(inst, file_name)
    inst.start("-c", str(config))  # inst.start passes --name inst.name
    assert sorted(inst.wait_workers(5)) == expected_titles(inst.name)
    assert master_of(file_name) is None
    assert not [p for p in instance_procs(file_name)]
    assert inst.run("status", "--name", file_name).returncode == 3
    assert inst.stop().returncode == 0
    assert not instance_procs(inst.name)


def test_stop_and_status_take_the_name_from_the_file(inst):
    config, _ = write_groups(inst, inst.name)
    started = inst.run("start", "-c", str(config), "-d", "--log-file", str(inst.log), name=False)
    assert started.returncode == 0, (started.stdout, started.stderr, inst.read_log())
    master = inst.master()
    assert sorted(inst.wait_workers(5)) == expected_titles(inst.name)

    data = status_json(inst, "-c", str(config))  # no --name: from the file
    assert data["name"] == inst.name and data["master"]["pid"] == master.pid
    assert sorted(w["name"] for w in data["workers"]) == expected_titles(inst.name)

    stopped = inst.run("stop", "-c", str(config), name=False)
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
    assert f"{inst.name}-master (pid {master.pid})" in stopped.stdout
    assert gone(master.pid)
    assert not instance_procs(inst.name)
    assert inst.run("status", "-c", str(config), name=False).returncode == 3


def test_module_function_next_to_the_config_file(inst):
    # the config and its module live in conf/; the command runs from another folder
    config, records = write_groups(
        inst, inst.name, folder="conf", task="tp_groups_mod:work",
        setup="tp_groups_mod:setup", teardown="tp_groups_mod:teardown",
        module_file="tp_groups_mod.py",
    )
    assert not (inst.dir / "tp_groups_mod.py").exists()
    inst.start("-c", str(config))
    workers = inst.wait_workers(5)
    assert sorted(workers) == expected_titles(inst.name)
    wait_for(lambda: len([r for r in read(records) if r[0] == "task"]) == 5, 10,
             what="a task record from each worker")
    assert inst.stop().returncode == 0
    assert Counter(r[0] for r in read(records)) == {"setup": 5, "task": 5, "teardown": 5}


PER_GROUP_TIMEOUT = '''
name = "{name}"
graceful_timeout = 60

[groups.slow]
task = "jobs.py:long"
workers = 1
graceful_timeout = 0.5

[groups.fast]
task = "jobs.py:busy"
workers = 2
'''

LONG_TASK = '''

def long(ctx):
    global _count
    _count += 1
    record("start")
    time.sleep(30)
    record("end")
'''


@pytest.mark.timeout(60)
def test_group_graceful_timeout_overrides_the_top_level_one(inst):
    records = record_task(inst, 1.5, extra=LONG_TASK)
    config = inst.write("tprocess.toml", PER_GROUP_TIMEOUT.format(name=inst.name))
    inst.start("-c", str(config))
    workers = inst.wait_workers(3)
    slow = workers[f"{inst.name}-slow-0"]
    wait_started(records, {w.pid for w in workers.values()})

    began = time.monotonic()
    result = inst.stop()
    took = time.monotonic() - began
    # slow-0 gets its group's 0.5 s and is cut; fast-* get the top-level 60 s and finish
    assert result.returncode == 1, (result.stdout, result.stderr)
    cut = [line for line in result.stderr.splitlines() if "pid" in line]
    assert len(cut) == 1, result.stderr
    assert f"{inst.name}-slow-0 (pid {slow.pid})" in cut[0] and "cut" in cut[0], cut
    assert took < 15, took
    ends = {pid for pid, _ in records_of(records, "end")}
    assert {workers[f"{inst.name}-fast-{i}"].pid for i in range(2)} <= ends
    assert slow.pid not in ends
    assert f"killing {inst.name}-slow-0 (pid {slow.pid}) in the middle of a task" in inst.read_log()
    assert not instance_procs(inst.name)
