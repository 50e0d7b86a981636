"""Rolling reload: new code and config, a few workers at a time, no task cut, the master kept."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from e2e_support import WORD_RECORDS, status_json, word_records
from helpers import TPROCESS, instance_procs, pids, wait_for, workers_of

# The task imports a module of the user's own (lib.py): a reload must load both afresh.
JOBS = WORD_RECORDS + '''
import lib


def setup(ctx):
    lib.check_setup()
    record("setup", os.getpid(), lib.VERSION)


def work(ctx):
    record("start", os.getpid(), lib.VERSION)
    time.sleep(lib.TASK_SECONDS)
    record("end", os.getpid(), lib.VERSION)
    ctx.sleep(lib.PAUSE)
'''

LIB = '''
VERSION = {version!r}
TASK_SECONDS = {seconds}
PAUSE = {pause}


def check_setup():
    {setup_body}
'''

CONFIG = '''
name = "{name}"
graceful_timeout = 30
reload_batch = {batch}

[groups.ip]
task = "jobs.py:work"
setup = "jobs.py:setup"
workers = {workers}
'''


def write_code(inst, version, seconds=0.3, pause=0.0, setup_body="pass"):
    inst.write("lib.py", LIB.format(version=version, seconds=seconds, pause=pause, setup_body=setup_body))


records = word_records


def open_tasks(inst):
    """(pid, version) of tasks that started and never ended."""
    started, ended = {}, {}
    for kind, pid, version in records(inst):
        target = started if kind == "start" else ended if kind == "end" else None
        if target is not None:
            target[(pid, version)] = target.get((pid, version), 0) + 1
    return [key for key, count in started.items() if ended.get(key, 0) < count]


def group_sizes(name, master_pid, group):
    return len([t for t in _titles(name, master_pid) if t.startswith(f"{name}-{group}-")])


def _titles(name, master_pid):
    """Titles of the master's live children, duplicates kept (a candidate shares its title)."""
    from chaos_support import children_of

    return [p.title for p in children_of(master_pid) if p.state != "Z" and p.title.startswith(f"{name}-")]


class Sampler(threading.Thread):
    """Counts the group's processes every few ms while a reload rolls."""

    def __init__(self, name, master_pid, group):
        super().__init__(daemon=True)
        self.args = (name, master_pid, group)
        self.sizes: list[int] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.sizes.append(group_sizes(*self.args))
            time.sleep(0.005)


def start_config(inst, workers=3, batch=1):
    inst.write("tprocess.toml", CONFIG.format(name=inst.name, workers=workers, batch=batch))
    # the name from the file, not --name: a --name would be kept over the reload
    started = inst.run("start", "-c", "tprocess.toml", "-d", "--log-file", str(inst.log), name=False)
    assert started.returncode == 0, (started.stdout, started.stderr, inst.read_log())
    return inst.wait_workers(workers)


@pytest.mark.timeout(90)
def test_reload_rolls_new_code_keeping_the_master_and_cutting_no_task(inst):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1")
    before = start_config(inst, workers=3, batch=1)
    master = inst.master()
    wait_for(lambda: sum(1 for r in records(inst) if r[0] == "end") >= 3, 15, what="tasks running")

    write_code(inst, "v2-new")
    sampler = Sampler(inst.name, master.pid, "ip")
    sampler.start()
    result = inst.run("reload")
    sampler.done.set()
    sampler.join()
    assert result.returncode == 0, (result.stdout, result.stderr, inst.read_log())
    for title, proc in before.items():
        assert f"{title} (pid {proc.pid} -> " in result.stdout, result.stdout

    assert inst.master().pid == master.pid
    after = inst.wait_workers(3)
    assert not {p.pid for p in after.values()} & {p.pid for p in before.values()}
    new_pids = {str(p.pid) for p in after.values()}
    wait_for(lambda: {r[1] for r in records(inst) if r[0] == "end" and r[2] == "v2-new"} == new_pids,
             15, what="every new worker to run the new code")
    old_pids = {str(p.pid) for p in before.values()}
    assert not [t for t in open_tasks(inst) if t[0] in old_pids], "a task of an old worker was cut"
    assert all(r[2] == "v1" for r in records(inst) if r[1] in old_pids)
    # never fewer than N processes, never more than N + reload_batch
    assert sampler.sizes and min(sampler.sizes) >= 3 and max(sampler.sizes) <= 4, sampler.sizes
    status = status_json(inst)
    assert status["master"]["generation"] == 2
    assert {w["last_reason"] for w in status["workers"]} == {"reload"}
    assert status["groups"][0]["restarts"]["reload"] == 3
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_reload_in_batches_never_drops_below_n(inst):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1", seconds=0.05)
    start_config(inst, workers=6, batch=3)
    master = inst.master()
    write_code(inst, "v2", seconds=0.05)
    sampler = Sampler(inst.name, master.pid, "ip")
    sampler.start()
    result = inst.run("reload")
    sampler.done.set()
    sampler.join()
    assert result.returncode == 0, result.stderr
    assert min(sampler.sizes) >= 6 and max(sampler.sizes) <= 9, sampler.sizes
    assert len(status_json(inst)["workers"]) == 6
    # v1 and v2 files have the same size and may share an mtime second: the bytecode cache
    # must not hand the new workers the old code
    pids = {str(p.pid) for p in inst.wait_workers(6).values()}
    wait_for(lambda: pids <= {r[1] for r in records(inst) if r[0] == "end" and r[2] == "v2"}, 10,
             what="the new code in every new worker")
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("breakage", ["syntax", "import", "key", "type", "name"])
def test_broken_reload_is_refused_and_the_pool_goes_on(inst, breakage):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1", seconds=0.05)
    before = start_config(inst, workers=2)
    if breakage == "syntax":
        inst.write("lib.py", "VERSION = 'v2\n")
        expected = "syntax error"
    elif breakage == "import":
        inst.write("lib.py", "import no_such_module_anywhere\n")
        expected = "no_such_module_anywhere"
    elif breakage == "key":
        inst.write("tprocess.toml", CONFIG.format(name=inst.name, workers=2, batch=1) + "colour = 3\n")
        expected = "unknown key 'colour'"
    elif breakage == "type":
        inst.write("tprocess.toml", CONFIG.format(name=inst.name, workers="'two'", batch=1))
        expected = "workers: expected an integer"
    else:
        inst.write("tprocess.toml", CONFIG.format(name=inst.name + "x", workers=2, batch=1))
        expected = "cannot rename"
    result = inst.run("reload")
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tprocess: error: ") and expected in lines[0], lines
    assert "Traceback" not in result.stderr
    assert pids(inst.wait_workers(2)) == pids(before)
    assert "refused" in inst.read_log()
    ends = len(records(inst))
    wait_for(lambda: len(records(inst)) > ends + 4, 10, what="the old workers to go on")
    status = status_json(inst)
    assert status["master"]["generation"] == 1 and status["master"]["state"] == "running"
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_reload_whose_new_setup_fails_goes_back_to_the_old_code(inst):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1", seconds=0.05)
    config = CONFIG.format(name=inst.name, workers=3, batch=2)
    inst.write("tprocess.toml", config + '[groups.old]\ntask = "jobs.py:work"\n')
    started = inst.run("start", "-c", "tprocess.toml", "-d", "--log-file", str(inst.log), name=False)
    assert started.returncode == 0, started.stderr
    before = inst.wait_workers(4)
    # the new file drops group `old`, grows `ip` to 4, adds `new`; the new code fails in setup
    inst.write("tprocess.toml", config.replace("workers = 3", "workers = 4")
               + '[groups.new]\ntask = "jobs.py:work"\n')
    write_code(inst, "v2", seconds=0.05, setup_body="raise RuntimeError('no database for v2')")
    result = inst.run("reload")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "no database for v2" in result.stderr and "failed during start-up" in result.stderr
    assert "Traceback (most recent call last):" in result.stderr.splitlines()  # readable, not escaped
    workers = inst.wait_workers(4)
    assert pids(workers) == pids(before)  # every old worker kept, group `old` included; `new` never stayed
    status = status_json(inst)
    assert status["master"]["state"] == "running"
    assert {w["generation"] for w in status["workers"]} == {1}
    assert [g["name"] for g in status["groups"]] == ["ip", "old"]
    ends = len(records(inst))
    wait_for(lambda: len(records(inst)) > ends + 6, 10, what="the old workers to go on")
    assert all(r[2] == "v1" for r in records(inst)[ends:] if r[0] == "end")
    assert inst.stop().returncode == 0


GROUPS = '''
name = "{name}"
[groups.a]
task = "jobs.py:work"
workers = {a}
{rest}
'''


@pytest.mark.timeout(60)
def test_reload_adds_removes_and_resizes_groups(inst):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1", seconds=0.05, pause=0.2)
    inst.write("tprocess.toml", GROUPS.format(
        name=inst.name, a=2, rest='[groups.b]\ntask = "jobs.py:work"\n'))
    inst.start("-c", "tprocess.toml")
    inst.wait_workers(3)
    inst.write("tprocess.toml", GROUPS.format(
        name=inst.name, a=3, rest='[groups.c]\ntask = "jobs.py:work"\nworkers = 2\n'))
    result = inst.run("reload")
    assert result.returncode == 0, (result.stderr, inst.read_log())
    workers = inst.wait_workers(5)
    n = inst.name
    assert sorted(workers) == sorted([f"{n}-a-0", f"{n}-a-1", f"{n}-a-2", f"{n}-c-0", f"{n}-c-1"])
    status = status_json(inst)
    assert [g["name"] for g in status["groups"]] == ["a", "c"]
    assert open_tasks(inst) == [] or all(t[0] in {str(w.pid) for w in workers.values()}
                                        for t in open_tasks(inst))
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_sighup_reloads_and_a_second_reload_or_a_scale_during_a_roll_is_refused(inst):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1", seconds=0.05)
    before = start_config(inst, workers=2)
    master = inst.master()
    write_code(inst, "v2", seconds=0.05, setup_body="import time; time.sleep(1.5)")
    os.kill(master.pid, signal.SIGHUP)
    wait_for(lambda: status_json(inst)["master"]["state"] == "reloading", 10, what="the roll")
    second = inst.run("reload")
    assert second.returncode == 1 and "in progress" in second.stderr, second.stderr
    scaled = inst.run("scale", "3")  # nor a scale while it rolls
    assert scaled.returncode == 1 and "in progress" in scaled.stderr, scaled.stderr
    wait_for(lambda: status_json(inst)["master"]["state"] == "running", 20, what="the roll to end")
    after = inst.wait_workers(2)
    assert not {p.pid for p in after.values()} & {p.pid for p in before.values()}
    assert inst.master().pid == master.pid
    assert status_json(inst)["master"]["generation"] == 2
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_reload_of_an_instance_started_with_a_task_reimports_it_and_keeps_its_size(inst):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1", seconds=0.05)
    inst.start("jobs.py:work", "-n", "2")
    inst.wait_workers(2)
    scaled = inst.run("scale", "3")
    assert scaled.returncode == 0, scaled.stderr
    write_code(inst, "v2", seconds=0.05)
    result = inst.run("reload")
    assert result.returncode == 0, result.stderr
    workers = inst.wait_workers(3)
    pids = {str(p.pid) for p in workers.values()}
    wait_for(lambda: pids <= {r[1] for r in records(inst) if r[0] == "end" and r[2] == "v2"}, 10,
             what="the new code in every worker")
    assert inst.stop().returncode == 0


def test_reload_of_an_instance_not_running_is_an_error(inst):
    result = inst.run("reload")
    assert result.returncode == 1
    assert result.stderr.strip() == f"tprocess: error: tprocess {inst.name!r} is not running"


def test_only_the_users_own_modules_are_reloaded(tmp_path):
    """What a reload imports afresh: the task's file and the modules of its folder, never the
    standard library (pure or compiled) nor installed packages, nor tprocess."""
    import sys

    from tprocess import loader
    from tprocess.supervisor import one_task_config

    (tmp_path / "helper_for_reload_test.py").write_text("VALUE = 1\n")
    (tmp_path / "jobs.py").write_text("import bz2, colorsys, helper_for_reload_test, tprocess.aio\n"
                                      "def work(ctx):\n    pass\n")
    config = one_task_config("t", "jobs.py:work", 1)
    config.base_dir = str(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        loader.resolve_config(config)
    finally:
        sys.path.remove(str(tmp_path))
    assert "helper_for_reload_test" in loader._user_modules
    assert {"bz2", "_bz2", "colorsys", "tprocess.aio", "tprocess"}.isdisjoint(loader._user_modules)


@pytest.mark.timeout(60)
def test_stop_during_a_roll_ends_it_and_stops_everything(inst):
    inst.write("jobs.py", JOBS)
    write_code(inst, "v1", seconds=0.05)
    start_config(inst, workers=2)
    write_code(inst, "v2", seconds=0.05, setup_body="import time; time.sleep(1)")
    reload = subprocess.Popen([TPROCESS, "reload", "--name", inst.name], cwd=inst.dir,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: status_json(inst)["master"]["state"] == "reloading", 10, what="the roll")
        assert inst.stop().returncode == 0
        _, err = reload.communicate(timeout=30)
        assert reload.returncode == 1 and "stopping" in err
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.communicate()
    assert not instance_procs(inst.name)
    assert not workers_of(inst.name, 0)
