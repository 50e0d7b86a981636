"""Protection from the workers people write: hung tasks, hung setups, leaks (task_timeout,
setup_timeout, max_tasks, max_memory), each replacement logged and counted by reason."""

from __future__ import annotations

import os
import re
import signal

import pytest
from e2e_support import WORD_RECORDS, status_json, word_records
from helpers import wait_for

CONFIG = '''
name = "{name}"
min_uptime = 0
[groups.g]
task = "jobs.py:work"
workers = {workers}
{options}
'''

def start(inst, code, options, workers=1):
    inst.write("jobs.py", WORD_RECORDS + code)
    inst.write("tprocess.toml", CONFIG.format(name=inst.name, workers=workers, options=options))
    inst.start("-c", "tprocess.toml")


records = word_records


def worker_status(inst, title):
    return next(w for w in status_json(inst)["workers"] if w["name"] == title)


@pytest.mark.timeout(60)
def test_a_hung_task_is_killed_past_task_timeout_and_replaced(inst):
    start(inst, '''
def work(ctx):
    record("task", os.getpid())
    if not os.path.exists("hung-once"):
        open("hung-once", "w").close()
        time.sleep(3600)   # hung on a dead socket, say
    ctx.sleep(0.05)
''', "task_timeout = 0.5")
    title = f"{inst.name}-g-0"
    first = wait_for(lambda: records(inst) and records(inst)[0][1], 10, what="the first task")
    status = wait_for(lambda: (w := worker_status(inst, title))["pid"] and str(w["pid"]) != first and w,
                      15, what="the hung worker's replacement")
    assert status["last_reason"] == "task_timeout" and status["state"] != "failed"
    log = inst.read_log()
    line = re.search(rf"task of {title} \(pid {first}\) has run (\d+\.\d)s, past task_timeout 0.5s", log)
    assert line and 0.5 <= float(line.group(1)) < 5, log
    group = status_json(inst)["groups"][0]
    assert group["restarts"]["task_timeout"] == 1 and group["restarts"]["crash"] == 0
    wait_for(lambda: len(records(inst)) > 5, 10, what="the replacement to work")  # no false alarms
    assert worker_status(inst, title)["restarts"] == 1
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_a_task_that_sleeps_in_ctx_sleep_is_not_hung(inst):
    start(inst, '''
def work(ctx):
    record("task", os.getpid())
    time.sleep(0.2)
    ctx.sleep(1.0)   # idle: not counted against task_timeout
    time.sleep(0.2)
''', "task_timeout = 0.6")
    wait_for(lambda: len(records(inst)) >= 3, 15, what="three long tasks")
    status = status_json(inst)
    assert status["workers"][0]["restarts"] == 0, inst.read_log()
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_a_setup_that_hangs_is_killed_and_counts_as_a_failure(inst):
    inst.write("jobs.py", WORD_RECORDS + '''
def setup(ctx):
    record("setup", os.getpid())
    if len(open(RECORDS).read().splitlines()) > 1:
        time.sleep(3600)

def work(ctx):
    ctx.sleep(1)
''')
    inst.write("tprocess.toml", CONFIG.format(
        name=inst.name, workers=1, options='setup = "jobs.py:setup"\nsetup_timeout = 0.3\nmax_failures = 4'))
    inst.start("-c", "tprocess.toml")  # the first setup is quick: start-up succeeds
    title = f"{inst.name}-g-0"
    first = worker_status(inst, title)["pid"]
    os.kill(first, signal.SIGKILL)  # a crash (failure 1); the next setups hang (failures 2, 3, 4)
    status = wait_for(lambda: (w := worker_status(inst, title))["state"] == "failed" and w, 20,
                      what="the worker to be marked failed after hung setups")
    assert status["last_reason"] == "setup_timeout"
    setups = [r for r in records(inst) if r[0] == "setup"]
    assert len(setups) == 4, setups  # the first, then three hung ones, each killed
    assert status_json(inst)["groups"][0]["restarts"]["setup_timeout"] == 3
    inst.wait_log("still in setup after 0.3s (setup_timeout)")
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_max_tasks_recycles_each_worker_after_that_many_tasks(inst):
    start(inst, '''
def work(ctx):
    record("task", os.getpid())
''', "max_tasks = 5", workers=2)
    wait_for(lambda: len({r[1] for r in records(inst)}) >= 6, 15, what="several generations of workers")
    status = status_json(inst)
    stopped = inst.stop()
    assert stopped.returncode == 0
    per_pid: dict[str, int] = {}
    for _, pid in records(inst):
        per_pid[pid] = per_pid.get(pid, 0) + 1
    assert all(count <= 5 for count in per_pid.values()), per_pid
    assert sum(1 for count in per_pid.values() if count == 5) >= 4, per_pid
    group = status["groups"][0]
    assert group["restarts"]["max_tasks"] >= 4 and group["restarts"]["crash"] == 0
    assert all(w["failures"] == 0 for w in status["workers"])
    inst.wait_log("recycles itself after 5 tasks (max_tasks)")


@pytest.mark.timeout(60)
def test_max_memory_recycles_a_leaking_worker_at_a_task_boundary(inst):
    start(inst, '''
LEAK = []

def work(ctx):
    LEAK.append(bytearray(8 << 20))   # 8 MiB more each task, touched
    record("task", os.getpid(), len(LEAK))
    ctx.sleep(0.3)
''', 'max_memory = "60MiB"')
    title = f"{inst.name}-g-0"
    status = wait_for(lambda: (w := worker_status(inst, title))["last_reason"] == "max_memory" and w, 30,
                      what="the leaking worker to be recycled")
    assert status["failures"] == 0 and status["state"] != "failed"
    leaked = max(int(r[2]) for r in records(inst))
    assert 3 <= leaked <= 12, records(inst)  # it ran until past 60 MiB, not forever
    inst.wait_log("past max_memory 60.0 MiB")
    assert inst.stop().returncode == 0


@pytest.mark.timeout(30)
def test_status_shows_the_running_time_of_the_current_task(inst):
    start(inst, '''
def work(ctx):
    record("task", os.getpid())
    time.sleep(3600)
''', "")
    wait_for(lambda: records(inst), 10, what="the task")
    first = wait_for(lambda: (t := status_json(inst)["workers"][0]["task_time"]) and t > 0.2 and t, 10,
                     what="a task time")
    later = wait_for(lambda: (t := status_json(inst)["workers"][0]["task_time"]) > first + 0.2 and t, 10,
                     what="the task time to grow")
    assert later > first
    table = inst.run("status")
    assert table.returncode == 0
    assert inst.stop("--timeout", "0.5").returncode == 1  # the task never ends: it is cut, and said so


@pytest.mark.parametrize("options,words", [
    ('max_memory = "lots"', "max_memory: 'lots' is not a size"),
    ("max_memory = 100", "max_memory: expected 1MiB to 1PiB"),
    ("task_timeout = -1", "task_timeout: expected more than 0"),
    ('setup_timeout = "x"', "setup_timeout: expected a number of seconds"),
    ("max_tasks = 0", "max_tasks: expected a whole number"),
    ("reload_batch = 0", "reload_batch: expected a whole number"),
])
def test_bad_protection_keys_are_one_line_errors(inst, options, words):
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(1)\n")
    inst.write("tprocess.toml", CONFIG.format(name=inst.name, workers=1, options=options))
    result = inst.run("start", "-c", "tprocess.toml", "-d")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.stdout, result.stderr)
    assert lines[0].startswith("tprocess: error: ") and "groups.g" in lines[0] and words in lines[0], lines
