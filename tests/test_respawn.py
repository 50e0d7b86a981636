"""Self-healing: reaping, backoff, failed groups, planned exits, failing tasks, setup errors."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from e2e_support import FAST_RESPAWN, LOG_LINE, status_json
from helpers import instance_procs, pids, wait_for, workers_of, zombie_children

SLEEPER = "def work(ctx):\n    ctx.sleep(3600)\n"


@pytest.mark.timeout(90)
def test_no_zombies_after_50_kills(inst):
    # min_uptime = 0: a kill -9 from outside is not an early death, so no backoff slows the test
    inst.write("jobs.py", SLEEPER)
    config = inst.write("tprocess.toml", FAST_RESPAWN.format(name=inst.name))
    inst.start("-c", str(config))
    master = inst.master()
    titles = sorted(inst.wait_workers(3))
    killed = []
    for i in range(50):
        title = titles[i % 3]
        victim = workers_of(inst.name, master.pid)[title]
        assert victim.ppid == master.pid
        os.kill(victim.pid, signal.SIGKILL)
        killed.append(victim.pid)

        def replaced(title=title, old=victim.pid):
            w = workers_of(inst.name, master.pid).get(title)
            return w if w and w.pid != old else None

        wait_for(replaced, 10, what=f"the replacement of {title} after kill {i + 1}")
    assert len(workers_of(inst.name, master.pid)) == 3
    assert zombie_children(master.pid) == []
    assert inst.master().pid == master.pid
    inst.wait_log(*(f"(pid {pid}) was killed by SIGKILL" for pid in killed))
    data = status_json(inst)
    assert sum(w["restarts"] for w in data["workers"]) == 50
    assert inst.stop().returncode == 0
    assert not instance_procs(inst.name)


CRASH_LOOP = '''
name = "{name}"
max_failures = {max_failures}

[groups.ok]
task = "jobs.py:fine"

[groups.crash]
task = "jobs.py:crash"
'''

CRASH_JOBS = '''
import sys


def fine(ctx):
    ctx.sleep(3600)


def crash(ctx):
    sys.exit(1)
'''


def exits_of(log: str, title: str) -> list[float]:
    """Monotonic-ish times (from log timestamps) of each exit of a worker."""
    times = []
    for line in log.splitlines():
        m = LOG_LINE.match(line)
        if m and re.match(rf"worker {re.escape(title)} \(pid \d+\) exited with code 1 ", m["message"]):
            stamp = line[:23]
            t = time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")
            times.append(time.mktime(t) + int(stamp[20:]) / 1000)
    return times


@pytest.mark.timeout(60)
def test_crash_loop_backs_off(inst):
    inst.write("jobs.py", CRASH_JOBS)
    config = inst.write("tprocess.toml", CRASH_LOOP.format(name=inst.name, max_failures=1000))
    inst.start("-c", str(config))
    title = f"{inst.name}-crash-0"
    began = time.monotonic()
    states = set()
    while time.monotonic() - began < 3.0:
        data = status_json(inst)
        states.add(next(w["state"] for w in data["workers"] if w["name"] == title))
    exits = exits_of(inst.read_log(), title)
    # without backoff this is a fork loop of thousands of forks in 3 s
    assert 3 <= len(exits) < 30, len(exits)
    assert "backoff" in states, states
    # the waits grow (0.1 s, 0.2 s, 0.4 s ...): a timer never fires early, so each gap
    # between exits is at least its delay, however loaded the machine is
    gaps = [b - a for a, b in zip(exits[1:], exits[2:], strict=False)]
    assert len(gaps) >= 3, gaps
    for i, gap in enumerate(gaps):
        assert gap >= 0.1 * 2**i - 0.01, gaps
    assert re.search(rf"restarting {re.escape(title)} in [\d.]+s \(failure \d+ in a row\)",
                     inst.read_log())
    ok = next(w for w in status_json(inst)["workers"] if w["name"] == f"{inst.name}-ok-0")
    assert ok["restarts"] == 0 and ok["state"] == "idle"
    assert inst.stop().returncode == 0
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
def test_crash_loop_ends_in_failed_state(inst):
    inst.write("jobs.py", CRASH_JOBS)
    config = inst.write("tprocess.toml", CRASH_LOOP.format(name=inst.name, max_failures=3))
    inst.start("-c", str(config))
    title = f"{inst.name}-crash-0"

    def failed():
        data = status_json(inst)
        crash = next(w for w in data["workers"] if w["name"] == title)
        return crash if crash["state"] == "failed" else None

    crash = wait_for(failed, 15, what="the crash group to be marked failed")
    assert crash["pid"] is None and crash["failures"] == 3
    log = inst.wait_log("not restarting it")
    assert re.search(rf"{re.escape(title)} failed 3 times in a row within [\d.]+s of starting; "
                     "not restarting it", log), log
    assert len(exits_of(log, title)) == 3
    master = inst.master()
    assert list(workers_of(inst.name, master.pid)) == [f"{inst.name}-ok-0"]
    # it stays failed: no more forks
    time.sleep(0.5)
    assert len(exits_of(inst.read_log(), title)) == 3
    assert inst.stop().returncode == 0
    assert not instance_procs(inst.name)


PLANNED_EXIT = '''
import os

MARK = {mark!r}


def work(ctx):
    # the first three workers to run end with SystemExit(0); later ones stay
    n = len(os.listdir(MARK))
    if n < 3:
        open(os.path.join(MARK, str(os.getpid())), "w").close()
        raise SystemExit(0)
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_planned_exit_is_replaced_without_backoff(inst):
    mark = inst.dir / "exits"
    mark.mkdir()
    inst.write("jobs.py", PLANNED_EXIT.format(mark=str(mark)))
    inst.start("jobs.py:work", "-n", "1")
    master = inst.master()
    title = f"{inst.name}-0"

    def settled():
        w = workers_of(inst.name, master.pid).get(title)
        return w if w and len(os.listdir(mark)) == 3 and str(w.pid) not in os.listdir(mark) else None

    w = wait_for(settled, 10, what="a worker that stays after three planned exits")
    log = inst.wait_log(*(f"worker {title} (pid {pid}) exited with code 0" for pid in os.listdir(mark)))
    assert "restarting" not in log  # no backoff delay was scheduled
    data = status_json(inst)
    (entry,) = data["workers"]
    assert entry["pid"] == w.pid and entry["restarts"] == 3 and entry["failures"] == 0
    assert inst.stop().returncode == 0


RAISING = '''
import os


def work(ctx):
    ctx.n = getattr(ctx, "n", 0) + 1
    if ctx.n <= 2:
        raise ValueError(f"boom number {ctx.n} in {os.getpid()}")
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_task_exception_is_logged_counted_and_worker_goes_on(inst):
    inst.write("jobs.py", RAISING)
    inst.start("jobs.py:work", "-n", "2")
    master = inst.master()
    before = inst.wait_workers(2)

    def counted():
        data = status_json(inst)
        return data if all(w["errors"] == 2 for w in data["workers"]) else None

    data = wait_for(counted, 10, what="two errors counted for each worker")
    log = inst.read_log()
    for title, proc in before.items():
        entry = next(w for w in data["workers"] if w["name"] == title)
        assert entry["pid"] == proc.pid and entry["restarts"] == 0
        assert f"{title}[{proc.pid}] ERROR task of {title} raised" in log
        for n in (1, 2):
            assert f"ValueError: boom number {n} in {proc.pid}" in log
    assert log.count("Traceback (most recent call last)") == 4
    assert 'jobs.py", line' in log
    assert pids(workers_of(inst.name, master.pid)) == pids(before)  # same pids: nobody was replaced
    assert inst.stop().returncode == 0


FAILING_SETUP = '''
def setup(ctx):
    raise RuntimeError("database unreachable: code 4242")


def work(ctx):
    ctx.sleep(3600)
'''

SETUP_CONFIG = '''
name = "{name}"

[groups.db]
task = "jobs.py:work"
setup = "jobs.py:setup"
workers = 2
'''


@pytest.mark.timeout(60)
def test_every_worker_failing_setup_fails_start(inst):
    inst.write("jobs.py", FAILING_SETUP)
    config = inst.write("tprocess.toml", SETUP_CONFIG.format(name=inst.name))
    began = time.monotonic()
    result = inst.run("start", "-c", str(config), "-d", "--log-file", str(inst.log), timeout=30)
    took = time.monotonic() - began
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert took < 10, took
    assert "RuntimeError: database unreachable: code 4242" in result.stderr
    assert "Traceback" in result.stderr
    assert "failed" in result.stderr
    assert not instance_procs(inst.name)
    assert inst.run("status").returncode == 3
    assert json.loads(inst.run("status", "--json").stdout)["master"] is None


ALWAYS_RAISING = '''
def work(ctx):
    raise KeyError("always")
'''


@pytest.mark.timeout(60)
def test_task_failing_every_time_is_slowed_down(inst):
    inst.write("jobs.py", ALWAYS_RAISING)
    inst.start("jobs.py:work", "-n", "1")
    (worker,) = inst.wait_workers(1).values()
    before = time.monotonic()
    wait_for(lambda: inst.read_log().count("KeyError: 'always'") >= 3, 10, what="three errors")
    time.sleep(max(0.0, 2.0 - (time.monotonic() - before)))  # the point: count over 2 s
    errors = next(w["errors"] for w in status_json(inst)["workers"])
    # unthrottled, a raising task runs thousands of times in 2 s
    assert 3 <= errors < 30, errors
    assert workers_of(inst.name, inst.master().pid)[worker.title].pid == worker.pid
    assert inst.stop().returncode == 0


RESETTING = '''
import os
import sys
import time

MARK = {mark!r}


def work(ctx):
    # the first two workers crash at once; later ones crash after a stable run
    n = len(os.listdir(MARK))
    open(os.path.join(MARK, str(os.getpid())), "w").close()
    if n >= 2:
        time.sleep(0.8)
    sys.exit(1)
'''

RESET_CONFIG = '''
name = "{name}"
min_uptime = 0.5
max_failures = 3

[groups.r]
task = "jobs.py:work"
'''


@pytest.mark.timeout(60)
def test_backoff_resets_after_a_stable_run(inst):
    mark = inst.dir / "runs"
    mark.mkdir()
    inst.write("jobs.py", RESETTING.format(mark=str(mark)))
    config = inst.write("tprocess.toml", RESET_CONFIG.format(name=inst.name))
    inst.start("-c", str(config))
    title = f"{inst.name}-r-0"
    # 2 early deaths, then 3 deaths after a stable run: 5 failures, never 3 early ones in a row
    wait_for(lambda: len(exits_of(inst.read_log(), title)) >= 5, 20, what="five exits")
    log = inst.read_log()
    assert f"restarting {title} in 0.1s (failure 2 in a row)" in log
    assert "not restarting" not in log
    (entry,) = status_json(inst)["workers"]
    assert entry["state"] != "failed" and entry["failures"] <= 1, entry
    assert inst.stop().returncode == 0


ONE_GROUP_FAILS = '''
name = "{name}"

[groups.ok]
task = "jobs.py:work"
workers = 2

[groups.bad]
task = "jobs.py:work"
setup = "jobs.py:setup"
workers = 2
'''


@pytest.mark.timeout(60)
def test_one_group_failing_setup_fails_the_whole_start(inst):
    inst.write("jobs.py", FAILING_SETUP)
    config = inst.write("tprocess.toml", ONE_GROUP_FAILS.format(name=inst.name))
    result = inst.run("start", "-c", str(config), "-d", "--log-file", str(inst.log), timeout=30)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "'bad'" in result.stderr and "database unreachable: code 4242" in result.stderr
    assert not instance_procs(inst.name)  # the healthy group was stopped too


@pytest.mark.timeout(60)
def test_foreground_start_with_failing_setup_exits_non_zero(inst):
    inst.write("jobs.py", FAILING_SETUP)
    config = inst.write("tprocess.toml", SETUP_CONFIG.format(name=inst.name))
    proc = inst.start_foreground("-c", str(config))
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    assert "RuntimeError: database unreachable: code 4242" in err
    assert err.count("Traceback") <= 4, err  # a setup error per worker, not a respawn loop
    assert not instance_procs(inst.name)
