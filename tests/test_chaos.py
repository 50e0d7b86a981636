"""Chaos: workers and masters killed at random, thousands of deaths, stops under
load, and storms of signals. Each test checks the promises that must survive it:
no zombie lingers, the pool comes back, no task is cut but those of the workers
that got SIGKILL, and nothing of the instance is left after a stop.

The long variants run with `pytest --soak` (marker `soak`).
"""

from __future__ import annotations

import random
import re
import signal
import statistics
import subprocess
import time

import pytest
from chaos_support import (
    alive,
    assert_zombies_reaped,
    fds_besides_worker_pipes,
    live_workers,
    log_has_no_traceback,
    signal_child,
    signal_master,
    start,
    status_field,
    status_json,
    unfinished_tasks,
    zombies_of,
)
from e2e_support import read_records
from helpers import TPROCESS, instance_procs, wait_for

# --- 1. worker chaos ---------------------------------------------------------------------

CHAOS_TASK = '''
import os, random, time

RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records.log")
_fd = None
_n = 0


def work(ctx):
    global _fd, _n
    if _fd is None:
        _fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _n += 1
    pid = os.getpid()
    os.write(_fd, b"S %d %d\\n" % (pid, _n))
    time.sleep(random.random() * 0.05)
    os.write(_fd, b"E %d %d\\n" % (pid, _n))
'''

POOL = 20


def _worker_chaos(inst, duration: float) -> None:
    inst.write("chaos.py", CHAOS_TASK)
    records = inst.dir / "records.log"
    master = start(inst, "chaos.py:work", "-n", str(POOL))
    titles = {f"{inst.name}-{i}" for i in range(POOL)}
    wait_for(lambda: set(live_workers(inst.name, master)) == titles, 10, what="the full pool")

    rng = random.Random()
    killed: set[int] = set()
    recoveries: list[float] = []
    orphans: list[int] = []
    restart_took = None
    began = time.monotonic()
    master_kill_at = began + duration / 2
    while time.monotonic() - began < duration:
        assert not zombies_of(master), "a zombie child of the master in a quiet moment"
        if restart_took is None and time.monotonic() >= master_kill_at:
            # SIGKILL the master once: its workers finish their task and exit by
            # themselves; a new start cleans up whatever is left, then runs afresh.
            orphans = [p.pid for p in live_workers(inst.name, master).values()]
            signal_master(inst, master, signal.SIGKILL)
            wait_for(lambda m=master: not alive(m), 5, what="the killed master to die")
            t0 = time.monotonic()
            new_master = start(inst, "chaos.py:work", "-n", str(POOL))
            restart_took = time.monotonic() - t0
            assert new_master != master
            master = new_master
            wait_for(lambda m=master: set(live_workers(inst.name, m)) == titles, 10,
                     what="the full pool under the new master")
            assert not any(alive(pid) for pid in orphans), "a worker of the killed master lingers"
            continue
        workers = live_workers(inst.name, master)
        assert set(workers) == titles, sorted(workers)
        victim = rng.choice(list(workers.values()))
        t0 = time.monotonic()
        if not signal_child(master, victim.pid, signal.SIGKILL):
            continue
        killed.add(victim.pid)

        def back(victim_pid=victim.pid, m=master):
            now = live_workers(inst.name, m)
            return set(now) == titles and victim_pid not in {p.pid for p in now.values()}

        wait_for(back, 10, interval=0.001, what=f"the pool back to {POOL} after killing {victim.pid}")
        recoveries.append(time.monotonic() - t0)
        assert not zombies_of(master), "a zombie right after the respawn"
        time.sleep(rng.uniform(0.1, 0.4))  # chaos pacing: a few kills per second

    stopped = inst.stop()
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
    assert "cut" not in stopped.stderr and "killed" not in stopped.stderr, stopped.stderr
    assert f"and {POOL} workers" in stopped.stdout, stopped.stdout
    assert not instance_procs(inst.name), instance_procs(inst.name)

    recs = read_records(records)
    unfinished = unfinished_tasks(recs)
    assert set(unfinished) <= killed, (
        f"tasks cut in workers the test did not SIGKILL: "
        f"{ {pid: t for pid, t in unfinished.items() if pid not in killed} }"
    )
    assert all(len(tasks) == 1 for tasks in unfinished.values()), unfinished
    orphan_tasks = [r for r in recs if r[0] == "E" and int(r[1]) in orphans]
    assert orphan_tasks, "the killed master's workers left no record: the check proves nothing"

    recoveries_ms = sorted(1000 * r for r in recoveries)
    print(f"\nworker chaos {duration:.0f}s: {len(killed)} workers SIGKILLed, "
          f"{len(recs)} records, {len(unfinished)} tasks cut (all by SIGKILL); "
          f"pool back to {POOL} in median {statistics.median(recoveries_ms):.1f} ms, "
          f"max {recoveries_ms[-1]:.1f} ms ({sum(r > 1000 for r in recoveries_ms)} over 1 s); "
          f"start after the master's SIGKILL took {restart_took:.2f} s")
    assert len(killed) >= duration, "the chaos loop killed too few workers to mean anything"
    assert recoveries_ms[-1] < 5000, recoveries_ms


@pytest.mark.timeout(90)
def test_worker_chaos(inst):
    _worker_chaos(inst, 8.0)


@pytest.mark.soak
@pytest.mark.timeout(240)
def test_worker_chaos_soak(inst):
    _worker_chaos(inst, 30.0)


# --- 2. long life ------------------------------------------------------------------------

EXITER = '''
import os


def quick(ctx):
    os._exit(0)


def planned(ctx):
    raise SystemExit(0)
'''

EXITER_CONFIG = '''
[groups.quick]
task = "exiter.py:quick"
workers = 1

[groups.planned]
task = "exiter.py:planned"
workers = 1
'''


def _deaths(inst) -> int:
    return sum(w["restarts"] for w in status_json(inst)["workers"])


def _sample(pid: int) -> dict[str, int]:
    """The master's fds besides its live workers' output pipes (the least of 20 reads:
    it opens /proc files and forks workers now and then), threads (the most) and RSS (the least)."""
    reads = []
    for _ in range(20):
        fds = fds_besides_worker_pipes(pid)
        reads.append((fds, status_field(pid, "Threads"), status_field(pid, "VmRSS")))
        time.sleep(0.005)
    return {"fds": min(r[0] for r in reads), "threads": max(r[1] for r in reads),
            "rss_kib": min(r[2] for r in reads)}


def _long_life(inst, first: int, last: int) -> None:
    inst.write("exiter.py", EXITER)
    inst.write("tprocess.toml", EXITER_CONFIG)
    master = start(inst, "-c", "tprocess.toml")
    samples = {}
    zombies_seen = 0
    for target in (first, last):
        def reached(target=target) -> int:
            nonlocal zombies_seen
            zombies_seen += assert_zombies_reaped(master)
            count = _deaths(inst)
            return count if count >= target else 0

        count = wait_for(reached, 120, interval=0.05, what=f"{target} worker deaths")
        samples[count] = _sample(master)
    assert alive(master) and status_json(inst)["master"]["pid"] == master, "the master crashed"
    (n1, s1), (n2, s2) = samples.items()
    print(f"\nlong life: master at {n1} deaths {s1}, at {n2} deaths {s2}; "
          f"zombies seen (all reaped) {zombies_seen}")
    stopped = inst.stop()
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
    assert not instance_procs(inst.name)
    log_has_no_traceback(inst)
    assert s2["fds"] == s1["fds"], samples
    assert s2["threads"] == s1["threads"] == 1, samples
    assert s2["rss_kib"] - s1["rss_kib"] <= 2048, samples


@pytest.mark.timeout(120)
def test_long_life_no_growth(inst):
    _long_life(inst, 200, 1000)


@pytest.mark.soak
@pytest.mark.timeout(400)
def test_long_life_no_growth_soak(inst):
    _long_life(inst, 1000, 5000)


@pytest.mark.timeout(60)
def test_master_answers_while_workers_die_fast(inst):
    """Workers that exit as soon as they start: the master must still serve
    `status` and obey `stop`, not spin in its reaping loop."""
    inst.write("exiter.py", EXITER)
    master = start(inst, "exiter.py:quick", "-n", "16")
    for _ in range(3):
        began = time.monotonic()
        result = inst.run("status", "--json", timeout=30)
        took = time.monotonic() - began
        assert result.returncode == 0 and took < 5, (took, result.stderr[-500:])
    began = time.monotonic()
    stopped = inst.stop("--timeout", "5", timeout=30)
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - began < 10
    assert not alive(master)


# --- 3. stop under load ------------------------------------------------------------------

LOAD_TASK = '''
import os, time

RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records.log")
_fd = None
_n = 0


def _write(*fields):
    global _fd
    if _fd is None:
        _fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, (" ".join(map(str, fields)) + "\\n").encode())


def setup(ctx):
    _write("U", os.getpid())


def work(ctx):
    global _n
    _n += 1
    _write("S", os.getpid(), _n, "%.6f" % time.monotonic())
    time.sleep(2)
    _write("E", os.getpid(), _n, "%.6f" % time.monotonic())


def teardown(ctx):
    _write("D", os.getpid())
'''


def _stop_under_load(inst, workers: int) -> None:
    inst.write("load.py", LOAD_TASK)
    inst.write("tprocess.toml", f'''
[groups.load]
task = "load.py:work"
setup = "load.py:setup"
teardown = "load.py:teardown"
workers = {workers}
''')
    records = inst.dir / "records.log"
    master = start(inst, "-c", "tprocess.toml", timeout=120)

    def all_busy():
        return len({r[1] for r in read_records(records) if r[0] == "S"}) == workers

    wait_for(all_busy, 30, what=f"all {workers} workers in a task")
    stop_at = time.monotonic()
    began = time.monotonic()
    stopped = inst.stop(timeout=120)
    took = time.monotonic() - began
    recs = read_records(records)
    last_start = {}
    for r in recs:
        if r[0] == "S":
            last_start[r[1]] = max(last_start.get(r[1], 0.0), float(r[3]))
    remaining = max(last_start.values()) + 2 - stop_at
    print(f"\nstop under load ({workers} workers in 2 s tasks): stop took {took:.2f} s, "
          f"the longest task had {remaining:.2f} s left")
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
    assert "cut" not in stopped.stderr, stopped.stderr
    assert not alive(master) and not instance_procs(inst.name)
    assert not unfinished_tasks(recs), unfinished_tasks(recs)
    setups = [r[1] for r in recs if r[0] == "U"]
    teardowns = [r[1] for r in recs if r[0] == "D"]
    assert len(setups) == workers and sorted(setups) == sorted(teardowns), (setups, teardowns)
    assert took >= remaining - 0.5, "stop returned before the tasks could have finished"
    assert took < 15, took


@pytest.mark.timeout(90)
def test_stop_under_load(inst):
    _stop_under_load(inst, 40)


@pytest.mark.soak
@pytest.mark.timeout(180)
def test_stop_under_load_soak(inst):
    _stop_under_load(inst, 100)


# --- 4. signal storms --------------------------------------------------------------------

# Every worker sleeps to the next half-second boundary of CLOCK_MONOTONIC (shared by all
# processes, immune to wall-clock jumps) and
# exits there: all of them die together, a burst of SIGCHLD, twice a second.
TOGETHER_TASK = '''
import math, os, time

PERIOD = 0.5


def work(ctx):
    now = time.monotonic()
    boundary = (math.floor(now / PERIOD) + 1) * PERIOD
    if boundary - now < 0.15:
        boundary += PERIOD
    time.sleep(boundary - now)
    os._exit(0)
'''


@pytest.mark.timeout(60)
def test_storm_of_harmless_signals(inst):
    """SIGCHLD bursts from 30 workers dying together, plus bursts of SIGHUP (each burst
    starts a reload and the rest of it is refused while it rolls) and stray SIGCHLD
    sent to the master: same master, full pool, nothing lingers."""
    inst.write("together.py", TOGETHER_TASK)
    master = start(inst, "together.py:work", "-n", "30")
    rng = random.Random()
    sent = 0
    began = time.monotonic()
    while time.monotonic() - began < 3.0:
        sig = rng.choice([signal.SIGHUP, signal.SIGCHLD])
        for _ in range(100):
            signal_master(inst, master, sig)
        sent += 100
        assert_zombies_reaped(master)
        time.sleep(rng.uniform(0.02, 0.2))  # bursts at random moments of the cycle
    titles = {f"{inst.name}-{i}" for i in range(30)}
    wait_for(lambda: set(live_workers(inst.name, master)) == titles, 5, what="the full pool")
    status = wait_for(lambda: (s := status_json(inst))["master"]["state"] == "running" and s, 30,
                      what="the last reload to finish")
    assert status["master"]["pid"] == master
    assert all(w["pid"] for w in status["workers"]), status["workers"]
    assert len(status["workers"]) == 30
    restarts = sum(w["restarts"] for w in status["workers"])
    assert restarts >= 30 * 3, f"the workers did not die together as planned: {restarts}"
    log = inst.read_log()
    if "reload (SIGHUP)" in log:  # a storm of SIGCHLD alone is possible, if unlikely
        assert "refused" in log or "reload done" in log
    log_has_no_traceback(inst)
    print(f"\nsignal storm: {sent} signals to the master, {restarts} respawns, master {master} held")
    stopped = inst.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert not instance_procs(inst.name)


@pytest.mark.timeout(60)
def test_sigterm_in_the_middle_of_respawns(inst):
    """SIGTERM lands while the master reaps and respawns 20 workers: it stops
    fully, spawns nothing more, and does not crash."""
    inst.write("together.py", TOGETHER_TASK)
    offsets = (0.0, 0.002, 0.01)
    for offset in offsets:
        master = start(inst, "together.py:work", "-n", "20")
        wait_for(lambda m=master: len(live_workers(inst.name, m)) == 20, 10, what="20 workers")
        boundary = (int(time.monotonic() / 0.5) + 1) * 0.5
        time.sleep(max(0.0, boundary + offset - time.monotonic()))  # aim at the burst of deaths
        signal_master(inst, master, signal.SIGTERM)
        wait_for(lambda m=master: not alive(m), 10, what="the master to stop after SIGTERM")
        wait_for(lambda: not instance_procs(inst.name), 5, what="every process of the instance")
    log = inst.read_log()
    log_has_no_traceback(inst)
    assert log.count("stopping (SIGTERM)") == len(offsets), log[-2000:]
    assert log.count("stopped:") == len(offsets), log[-2000:]


BUSY_TASK = '''
import time


def work(ctx):
    time.sleep(30)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signals", [
    ("SIGUSR2", "SIGINT"), ("SIGINT", "SIGINT"), ("SIGQUIT",),
], ids=lambda s: "-".join(s))
def test_second_stop_signal_forces(inst, signals):
    """A stop signal then another in quick succession (or SIGQUIT) means stop now:
    busy workers are killed, the master exits at once and says so."""
    inst.write("busy.py", BUSY_TASK)
    master = start(inst, "busy.py:work", "-n", "6")
    workers = [p.pid for p in inst.wait_workers(6).values()]
    began = time.monotonic()
    for i, name in enumerate(signals):
        if name in signals[:i]:
            # the kernel merges a standard signal still pending with its twin:
            # the second is a second only once the first was received
            wait_for(lambda: "stopping (" in inst.read_log(), 5, what="the first signal to land")
        signal_master(inst, master, getattr(signal, name))
    wait_for(lambda: not alive(master), 10, what="the master to stop now")
    took = time.monotonic() - began
    wait_for(lambda: not any(alive(pid) for pid in workers), 5, what="the killed workers")
    assert not instance_procs(inst.name)
    log = inst.read_log()
    log_has_no_traceback(inst)
    assert log.count("in the middle of a task") == 6, log[-2000:]
    assert re.search(r"stopped: \d+ workers exited, 6 killed", log), log[-2000:]
    assert took < 5, took


@pytest.mark.timeout(60)
def test_stop_while_the_master_is_killed(inst):
    """`stop` is waiting and the master dies by SIGKILL: stop must say so, without
    a traceback, and exit non-zero; the workers still finish their tasks."""
    inst.write("busy.py", 'import time\n\ndef work(ctx):\n    time.sleep(2)\n')
    master = start(inst, "busy.py:work", "-n", "3")
    workers = [p.pid for p in inst.wait_workers(3).values()]
    stop = subprocess.Popen([TPROCESS, "stop", "--name", inst.name], cwd=inst.dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "stopping (stop command)" in inst.read_log(), 10, what="the stop to begin")
        signal_master(inst, master, signal.SIGKILL)
        out, err = stop.communicate(timeout=20)
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.communicate()
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, what="the workers to finish")
    assert stop.returncode not in (0, None), (out, err)
    assert "Traceback" not in err, err
    assert f"pid {master}" in err and "master" in err, err
    assert not instance_procs(inst.name)
