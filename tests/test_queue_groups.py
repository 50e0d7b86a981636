"""Queue groups end to end: the real `tprocess` command, real workers, against both real brokers.

Tasks append one line per event (`S id pid attempt` at a job's start, `E id pid attempt` at its end)
to a file beside them: small O_APPEND writes, so lines of different workers never mix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import TPROCESS, Instance, appended_lines, gone, instance_procs, master_of, wait_for, workers_of
from queue_fixtures import RedisServer

from tprocess.queue import open_broker

pytestmark = pytest.mark.timeout(120)

JOBS = '''
import asyncio, os, time
from tprocess import Reject

EVENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "events.txt")


def note(kind, job):
    line = f"{kind} {job.id} {os.getpid()} {job.attempt} {time.monotonic():.4f}\\n"
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)


def work(ctx, job):
    note("S", job)
    data = job.data if isinstance(job.data, dict) else {}
    if data.get("sleep"):
        time.sleep(data["sleep"])
    if data.get("hang_first") and job.attempt == 1:
        time.sleep(60)
    if data.get("fail") and not os.path.exists(os.path.join(os.path.dirname(EVENTS), "healed")):
        raise ValueError(f"failing job {job.id}")
    if data.get("reject"):
        raise Reject("not worth a retry")
    note("E", job)


async def awork(ctx, job):
    note("S", job)
    await asyncio.sleep(job.data.get("sleep", 0) if isinstance(job.data, dict) else 0)
    if isinstance(job.data, dict) and job.data.get("exit_first") and job.attempt == 1:
        raise SystemExit(0)
    note("E", job)


def one_arg(ctx):
    pass
'''


def setup_instance(inst: Instance, broker: str, group: str = "", workers: int = 3, task: str = "work",
                   **keys: object) -> Path:
    """jobs.py and a config with one queue group `ip` (plus extra TOML lines in `group`)."""
    inst.write("jobs.py", JOBS)
    options = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    return inst.write("tprocess.toml", f'broker = "{broker}"\n[groups.ip]\ntask = "jobs.py:{task}"\n'
                                       f'workers = {workers}\nqueue = "ip"\n{options}{group}')


def enqueue(inst: Instance, broker: str, items: list[object], queue: str = "ip") -> list[str]:
    result = inst.run("enqueue", "--broker", broker, queue, *(json.dumps(i) for i in items))
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def events(folder: Path) -> list[tuple[str, str, int, int, float]]:
    rows = []
    for line in appended_lines(folder / "events.txt"):
        kind, job_id, pid, attempt, when = line.split()
        rows.append((kind, job_id, int(pid), int(attempt), float(when)))
    return rows


def ended(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, job_id, *_ in events(folder):
        if kind == "E":
            counts[job_id] = counts.get(job_id, 0) + 1
    return counts


def stats(broker: str) -> dict[str, int]:
    with open_broker(broker) as b:
        return b.stats("ip")["ip"]


def settled(broker: str) -> bool:
    s = stats(broker)
    return s["waiting"] == s["delayed"] == s["running"] == 0


# --- reload and scale of a queue group -----------------------------------------------------------


def test_reload_and_scale_of_a_queue_group_lose_and_cut_no_job(inst, broker_url):
    setup_instance(inst, broker_url, workers=2)
    ids = enqueue(inst, broker_url, [{"n": n, "sleep": 0.05} for n in range(120)])
    inst.start("-c", "tprocess.toml")
    inst.wait_workers(2)
    wait_for(lambda: len(ended(inst.dir)) >= 10, timeout=30, what="jobs flowing")
    # a reload sets the group back to the file's 2 workers; each command waits for its workers
    for args in (("scale", "4"), ("reload",), ("scale", "-1")):
        result = inst.run(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    wait_for(lambda: len(ended(inst.dir)) == 120, timeout=60, what="every job done")
    done = ended(inst.dir)
    assert set(done) == set(ids) and set(done.values()) == {1}, "a job lost or done twice"
    started = {e[1] for e in events(inst.dir) if e[0] == "S"}
    assert started == set(done), "a job started and never ended: cut by a retiring worker"
    wait_for(lambda: settled(broker_url), timeout=10, what="nothing waiting or running")
    assert inst.stop().returncode == 0


# --- jobs processed once, failures, dead letters ------------------------------------------------


def test_enqueued_jobs_are_each_processed_once_by_three_workers(inst, broker_url):
    setup_instance(inst, broker_url)
    ids = enqueue(inst, broker_url, [{"n": n, "sleep": 0.005} for n in range(90)])
    inst.start("-c", "tprocess.toml")
    workers = inst.wait_workers(3)
    wait_for(lambda: len(ended(inst.dir)) == 90, timeout=30, what="90 jobs done")
    done = ended(inst.dir)
    assert set(done) == set(ids) and set(done.values()) == {1}
    assert {e[2] for e in events(inst.dir)} <= {p.pid for p in workers.values()}
    status = json.loads(inst.run("status", "--json").stdout)
    group = status["groups"][0]
    assert status["broker"] == broker_url
    assert group["tasks"] == 90 and group["errors"] == 0
    wait_for(lambda: settled(broker_url), timeout=10, what="the last acknowledgement")
    status = json.loads(inst.run("status", "--json").stdout)
    assert {k: status["groups"][0]["queue"][k] for k in ("name", "waiting", "running", "dead")} == {
        "name": "ip", "waiting": 0, "running": 0, "dead": 0}
    assert "queue ip: 0 waiting, 0 delayed, 0 running, 0 dead" in inst.run("status").stdout
    assert inst.stop().returncode == 0
    assert not instance_procs(inst.name)


def test_failing_job_retried_then_dead_lettered_and_queue_retry_brings_it_back(inst, broker_url):
    setup_instance(inst, broker_url, workers=1, max_retries=2, retry_delay=0.1)
    bad, rejected, good = enqueue(inst, broker_url, [{"fail": True}, {"reject": True}, {"n": 1}])
    inst.start("-c", "tprocess.toml")
    wait_for(lambda: stats(broker_url)["dead"] == 2, timeout=30, what="two dead jobs")
    attempts = sorted(e[3] for e in events(inst.dir) if e[0] == "S" and e[1] == bad)
    assert attempts == [1, 2, 3]  # max_retries = 2: three deliveries, then the dead-letter list
    assert [e[3] for e in events(inst.dir) if e[0] == "S" and e[1] == rejected] == [1]  # Reject: no retry
    assert ended(inst.dir) == {good: 1}
    dead = inst.run("queue", "--broker", broker_url, "dead", "ip")
    assert dead.returncode == 0 and bad in dead.stdout and rejected in dead.stdout
    listing = json.loads(inst.run("queue", "--broker", broker_url, "dead", "ip", "--json").stdout)
    bad_entry = next(d for d in listing if d["id"] == bad)
    assert bad_entry["attempts"] == 3 and "Traceback" in bad_entry["error"]
    assert f"ValueError: failing job {bad}" in bad_entry["error"]
    assert f"job {bad} of queue ip failed on attempt 1" in inst.read_log()
    status = json.loads(inst.run("status", "--json").stdout)
    assert status["groups"][0]["errors"] == 4 and status["groups"][0]["queue"]["dead"] == 2
    (inst.dir / "healed").write_text("")
    again = inst.run("queue", "--broker", broker_url, "retry", "ip", bad)
    assert again.returncode == 0, again.stderr
    wait_for(lambda: ended(inst.dir).get(bad) == 1, timeout=20, what="the retried job to succeed")
    assert stats(broker_url)["dead"] == 1
    assert inst.stop().returncode == 0


# --- stop, kill -----------------------------------------------------------------------------------


def test_stop_finishes_and_acks_the_job_in_progress(inst, broker_url):
    setup_instance(inst, broker_url, workers=2)
    inst.start("-c", "tprocess.toml")
    inst.wait_workers(2)
    (job,) = enqueue(inst, broker_url, [{"sleep": 1.5}])
    wait_for(lambda: any(e[0] == "S" for e in events(inst.dir)), timeout=15, what="the job to start")
    result = inst.stop()
    assert result.returncode == 0, result.stderr
    assert ended(inst.dir) == {job: 1}  # not cut
    s = stats(broker_url)
    assert s["running"] == s["waiting"] == 0 and s["done_last_minute"] == 1  # acknowledged
    assert not instance_procs(inst.name)


def test_idle_queue_workers_stop_at_once(inst, broker_url):
    setup_instance(inst, broker_url, workers=4)
    inst.start("-c", "tprocess.toml")
    inst.wait_workers(4)
    wait_for(lambda: json.loads(inst.run("status", "--json").stdout)["groups"][0]["states"] == {"idle": 4},
             timeout=15, what="4 workers waiting for a job")
    started = time.monotonic()
    result = inst.stop()
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < 1.5, f"stop of 4 idle queue workers took {took:.2f}s"  # ~0.2 s; a broker wait is 30 s
    print(f"stop of 4 idle queue workers: {took:.3f}s")
    assert "exited with code 0" in inst.read_log()


def test_job_of_a_sigkilled_worker_is_delivered_again_after_job_timeout(inst, broker_url):
    setup_instance(inst, broker_url, workers=1, job_timeout=1)
    inst.start("-c", "tprocess.toml")
    inst.wait_workers(1)
    (job,) = enqueue(inst, broker_url, [{"hang_first": True}])
    first = wait_for(lambda: [e for e in events(inst.dir) if e[0] == "S"], timeout=15, what="job start")
    killed_at = time.monotonic()
    os.kill(first[0][2], signal.SIGKILL)
    wait_for(lambda: ended(inst.dir).get(job) == 1, timeout=20, what="the job delivered again")
    again = [e for e in events(inst.dir) if e[0] == "S"][1]
    assert again[3] == 2 and again[2] != first[0][2]  # attempt 2, on the replacement worker
    assert again[4] - killed_at >= 0.5  # not before the lease ran out (job_timeout 1 s from its start)
    wait_for(lambda: settled(broker_url), timeout=10, what="the acknowledgement")
    assert inst.stop().returncode == 0


BATCH_OF_8 = """
import tprocess.queue.consumer as _consumer
_consumer.BatchSize.next = lambda self, most=64: min(8, most)  # a fixed batch: which jobs it holds is known
"""


def test_prefetched_jobs_of_a_sigkilled_worker_are_delivered_again_after_job_timeout(inst, broker_url):
    setup_instance(inst, broker_url, workers=1, job_timeout=1)
    inst.write("jobs.py", JOBS + BATCH_OF_8)
    jobs = [{"n": 0}, {"n": 1}, {"hang_first": True}, *({"n": n} for n in range(3, 12))]
    ids = enqueue(inst, broker_url, jobs)
    inst.start("-c", "tprocess.toml")
    hang = wait_for(lambda: [e for e in events(inst.dir) if e[0] == "S" and e[1] == ids[2]], timeout=15,
                    what="the hanging job to start")[0]
    # jobs 0 and 1 acknowledged (an ack is held 0.05 s at most while a later job runs), 5 prefetched
    wait_for(lambda: stats(broker_url)["running"] == 8 - 2, timeout=2, what="the batch held less 2 acks")
    killed_at = time.monotonic()
    os.kill(hang[2], signal.SIGKILL)
    wait_for(lambda: set(ended(inst.dir)) == set(ids), timeout=30, what="every job done")
    assert set(ended(inst.dir).values()) == {1}
    starts = {e[1]: e for e in events(inst.dir) if e[0] == "S" and e[2] != hang[2]}
    prefetched = ids[3:8]  # the batch of 8: 0, 1, the hanging job, then 5 never started
    assert all(starts[i][3] == 2 and starts[i][4] - killed_at >= 0.5 for i in prefetched + [ids[2]])
    assert all(starts[i][3] == 1 for i in ids[8:])  # the next batch: delivered once, without waiting
    assert set(ids[:2]).isdisjoint(starts)  # done and acknowledged before the kill: not run again
    wait_for(lambda: settled(broker_url), timeout=10, what="the acknowledgements")
    assert inst.stop().returncode == 0


def test_max_tasks_recycles_between_batches_in_fifo_order_with_nothing_handed_back(inst, broker_url):
    setup_instance(inst, broker_url, workers=1, max_tasks=6)  # batches of 1, 2, then 3 (not 4)
    ids = enqueue(inst, broker_url, [{"n": n} for n in range(40)])
    inst.start("-c", "tprocess.toml")
    wait_for(lambda: len(ended(inst.dir)) == 40, timeout=60, what="40 jobs done by recycled workers")
    starts = [e for e in events(inst.dir) if e[0] == "S"]
    assert [e[1] for e in starts] == ids  # one worker at a time: queue order, each once, attempt 1
    assert {e[3] for e in starts} == {1}
    per_pid: dict[int, int] = {}
    for e in starts:
        per_pid[e[2]] = per_pid.get(e[2], 0) + 1
    assert sorted(per_pid.values()) == [4] + [6] * 6  # 6 jobs per worker, then recycled
    wait_for(lambda: settled(broker_url), timeout=10, what="the acknowledgements")
    assert inst.stop().returncode == 0


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('broker = "ftp://host/x"', "unknown scheme 'ftp'"),
    ('broker = "redis://"', "expected a host"),
    ('broker = 5', "broker 5"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = 5', "groups.ip: queue: queue name 5"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "a b"', "queue name 'a b'"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = ""', "queue name ''"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\njob_timeout = "x"', "groups.ip: job_timeout"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\njob_timeout = 0', "groups.ip: job_timeout"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\nmax_retries = -1', "groups.ip: max_retries"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\nmax_retries = 1.5', "groups.ip: max_retries"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\nretry_delay = -1', "groups.ip: retry_delay"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\nconcurrency = 0', "groups.ip: concurrency"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\nconcurrency = true', "groups.ip: concurrency"),
    ('[groups.ip]\ntask = "jobs.py:one_arg"\njob_timeout = 3', "job_timeout: only for a group with a queue"),
    ('[groups.ip]\ntask = "jobs.py:one_arg"\nqueue = "ip"', "must take two arguments (ctx, job)"),
    ('[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\nconcurrency = 5', "needs an `async def` task"),
])
def test_bad_queue_config_is_one_line_and_nothing_runs(inst, line, message):
    inst.write("jobs.py", JOBS)
    groups = "" if "[groups." in line else '\n[groups.ip]\ntask = "jobs.py:work"\nqueue = "ip"\n'
    inst.write("bad.toml", f"{line}\n{groups}")
    result = inst.run("start", "-c", "bad.toml", "-d", "--log-file", str(inst.log))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tprocess: error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not instance_procs(inst.name)


def test_unreachable_broker_at_start_is_one_line_before_anything_forks(inst, tmp_path):
    from queue_fixtures import free_port

    for broker, code in ((f"redis://127.0.0.1:{free_port()}/0", 1),
                         (f"sqlite://{tmp_path}/no/such/folder/q.sqlite3", 1)):
        setup_instance(inst, broker)
        result = inst.run("start", "-c", "tprocess.toml", "-d", "--log-file", str(inst.log))
        assert result.returncode == code, (result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1 and "tprocess: error: broker unreachable:" in result.stderr
        assert not instance_procs(inst.name) and not inst.log.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_sqlite_on_a_read_only_file_system_is_one_clear_line(inst, tmp_path):
    """A read-only tmpfs mounted in a mount namespace of the command's own (nothing mounted
    on the machine): start and enqueue each say why in one line, and nothing runs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    broker = f"sqlite://{folder}/q.sqlite3"
    setup_instance(inst, broker)
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs {folder} || exit 99; "
              f"{TPROCESS} start -c tprocess.toml -d --name {inst.name} --log-file {inst.log}; echo rc=$?; "
              f"{TPROCESS} enqueue --broker {broker} ip '{{}}'; echo rc=$?")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=inst.dir,
                            capture_output=True, text=True, timeout=60)
    if result.returncode == 99:
        pytest.skip("no tmpfs mount here")
    assert result.stdout.split() == ["rc=1", "rc=1"], (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("tprocess: error: ") for line in lines), lines
    assert all("is read-only" in line for line in lines), lines
    assert not instance_procs(inst.name)


# --- async ----------------------------------------------------------------------------------------


def test_async_jobs_two_workers_of_concurrency_20_run_200_jobs_in_about_a_second(inst, broker_url):
    setup_instance(inst, broker_url, workers=2, task="awork", concurrency=20)
    inst.start("-c", "tprocess.toml")
    inst.wait_workers(2)
    enqueue(inst, broker_url, [{"sleep": 0.2} for _ in range(200)])
    wait_for(lambda: len(ended(inst.dir)) == 200, timeout=40, what="200 async jobs")
    rows = events(inst.dir)
    took = max(e[4] for e in rows if e[0] == "E") - min(e[4] for e in rows if e[0] == "S")
    assert took < 5.0, f"200 jobs of 0.2 s took {took:.2f}s (one at a time: 20 s)"
    per_pid: dict[int, int] = {}
    for kind, _, pid, *_ in rows:
        per_pid[pid] = per_pid.get(pid, 0) + (1 if kind == "S" else 0)
    assert len(per_pid) == 2
    assert max(_max_in_flight(rows, pid) for pid in per_pid) == 20  # never more than concurrency
    wait_for(lambda: settled(broker_url), timeout=10, what="the last acknowledgements")
    status = json.loads(inst.run("status", "--json").stdout)
    assert status["groups"][0]["tasks"] == 200
    print(f"200 async jobs of 0.2 s, 2 workers x concurrency 20: {took:.2f}s")
    # a stop with jobs in flight lets every one finish and acknowledges it
    enqueue(inst, broker_url, [{"sleep": 1.0} for _ in range(10)])
    wait_for(lambda: sum(1 for e in events(inst.dir) if e[0] == "S") >= 210, timeout=15, what="10 started")
    assert inst.stop().returncode == 0
    assert len(ended(inst.dir)) == 210 and settled(broker_url)


def _max_in_flight(rows: list[tuple[str, str, int, int, float]], pid: int) -> int:
    level = peak = 0
    for kind, *_ in sorted((e for e in rows if e[2] == pid), key=lambda e: (e[4], e[0] == "S")):
        level += 1 if kind == "S" else -1
        peak = max(peak, level)
    return peak


PLAIN_ASYNC = '''
import asyncio, os, time

EVENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "events.txt")


def note(kind):
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{kind} - {os.getpid()} 1 {time.monotonic():.4f}\\n".encode())
    os.close(fd)


async def crawl(ctx):
    note("S")
    await asyncio.sleep(0.3)
    note("E")
    await ctx.asleep(0.05)
'''


def test_plain_async_task_runs_concurrency_loops_and_a_stop_lets_them_finish(inst):
    inst.write("crawl.py", PLAIN_ASYNC)
    inst.write("tprocess.toml", '[groups.c]\ntask = "crawl.py:crawl"\nworkers = 1\nconcurrency = 5\n')
    inst.start("-c", "tprocess.toml")
    wait_for(lambda: sum(1 for e in events(inst.dir) if e[0] == "E") >= 10, timeout=20, what="10 calls")
    assert inst.stop().returncode == 0
    rows = events(inst.dir)
    assert _max_in_flight(rows, rows[0][2]) == 5
    assert sum(1 for e in rows if e[0] == "S") == sum(1 for e in rows if e[0] == "E")  # none cut


def test_async_job_raising_system_exit_ends_its_worker_as_planned_and_runs_again(inst, broker_url):
    """As in a plain task: sys.exit() ends the worker (code 0, not a crash) once the calls in flight
    end; the job counts as a failed attempt and runs again."""
    setup_instance(inst, broker_url, workers=1, task="awork", concurrency=2, retry_delay=0.05)
    (job_id,) = enqueue(inst, broker_url, [{"exit_first": True}])
    inst.start("-c", "tprocess.toml")
    wait_for(lambda: ("E", job_id) in {(e[0], e[1]) for e in events(inst.dir)}, timeout=30,
             what="the job's second attempt")
    rows = [e for e in events(inst.dir) if e[1] == job_id]
    assert [(kind, attempt) for kind, _, _, attempt, _ in rows] == [("S", 1), ("S", 2), ("E", 2)], rows
    assert rows[0][2] != rows[1][2]  # the first worker ended; its replacement ran attempt 2
    status = json.loads(inst.run("status", "--json", "--name", inst.name).stdout)
    assert status["groups"][0]["restarts"]["exit"] == 1 and status["groups"][0]["restarts"]["crash"] == 0
    assert f"(pid {rows[0][2]}) exited with code 0" in inst.read_log()
    assert inst.stop().returncode == 0


def test_plain_async_task_recycles_after_max_tasks_calls_once_those_in_flight_end(inst):
    inst.write("crawl.py", PLAIN_ASYNC)
    inst.write("tprocess.toml", '[groups.c]\ntask = "crawl.py:crawl"\nworkers = 1\nconcurrency = 3\n'
               'max_tasks = 6\n')
    inst.start("-c", "tprocess.toml")
    wait_for(lambda: len({e[2] for e in events(inst.dir)}) >= 3, timeout=30, what="three worker processes")
    status = json.loads(inst.run("status", "--json", "--name", inst.name).stdout)
    assert inst.stop().returncode == 0
    rows = events(inst.dir)
    assert sum(1 for e in rows if e[0] == "S") == sum(1 for e in rows if e[0] == "E")  # none cut
    per_pid: dict[int, int] = {}
    for kind, _, pid, *_ in rows:
        per_pid[pid] = per_pid.get(pid, 0) + (kind == "E")
    assert all(calls <= 6 + 2 for calls in per_pid.values()), per_pid  # max_tasks + those in flight
    assert status["groups"][0]["restarts"]["max_tasks"] >= 2, status["groups"][0]
    assert status["groups"][0]["restarts"]["crash"] == 0
    assert "recycles itself after 6 tasks (max_tasks)" in inst.read_log()


# --- no job lost ----------------------------------------------------------------------------------


def run_chaos(tmp_path: Path, kind: str, jobs: int, workers: int, chaos_s: float) -> None:
    """`jobs` jobs, two instances of `workers` workers; random workers SIGKILLed, one whole instance
    SIGKILLed (then started again) and, on Redis, redis-server restarted gracefully once."""
    server = None
    if kind == "redis":
        (tmp_path / "redis").mkdir()
        server = RedisServer(tmp_path / "redis", persistent=True).start()
        broker = server.url
    else:
        broker = f"sqlite://{tmp_path}/queue.sqlite3"
    folder = tmp_path / "work"
    folder.mkdir()
    instances = [Instance(f"t{os.urandom(5).hex()}", folder) for _ in range(2)]
    killed: set[int] = set()
    try:
        inst_a, inst_b = instances
        config = setup_instance(inst_a, broker, workers=workers, job_timeout=1, min_uptime=0,
                                retry_delay=0.05)
        ids = set(enqueue(inst_a, broker, [{"n": n, "sleep": 0.01} for n in range(jobs)]))
        for inst in instances:
            result = inst.run("start", "-c", str(config), "--name", inst.name, "-d", "--log-file",
                              str(folder / f"{inst.name}.log"))
            assert result.returncode == 0, result.stderr
        _chaos(instances, config, killed, server, chaos_s)
        wait_for(lambda: set(ended(folder)) >= ids, timeout=120, interval=0.2, what="every job finished")
        wait_for(lambda: settled(broker), timeout=30, what="nothing waiting or running")
        assert stats(broker)["dead"] == 0
        for inst in instances:
            assert inst.run("stop", "--name", inst.name).returncode in (0, 1)
        assert not any(instance_procs(inst.name) for inst in instances)
        rows = events(folder)
        dupes = {job_id for job_id, n in ended(folder).items() if n > 1}
        on_killed = {e[1] for e in rows if e[0] == "S" and e[2] in killed}
        unexplained = sorted(dupes - on_killed)
        assert not unexplained, f"finished twice, with no delivery on a killed worker: {unexplained}"
        print(f"{kind}: {jobs} jobs, {len(killed)} processes killed, {len(dupes)} finished twice")
    finally:
        for inst in instances:
            inst.cleanup()
        if server is not None:
            server.stop()


def _chaos(instances: list[Instance], config: Path, killed: set[int], server: RedisServer | None,
           seconds: float) -> None:
    rng = random.Random(7)
    failures: list[BaseException] = []

    def kill_random_workers() -> None:
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                inst = rng.choice(instances)
                master = master_of(inst.name)
                workers = list(workers_of(inst.name, master.pid).values()) if master else []
                if workers:
                    victim = rng.choice(workers)
                    killed.add(victim.pid)
                    os.kill(victim.pid, signal.SIGKILL)
                time.sleep(rng.uniform(0.05, 0.25))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=kill_random_workers, daemon=True)
    thread.start()
    time.sleep(seconds / 3)
    whole = instances[0]  # the whole instance, master and workers at once
    master = master_of(whole.name)
    assert master is not None
    victims = [master.pid, *(p.pid for p in workers_of(whole.name, master.pid).values())]
    killed.update(victims)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    if server is not None:
        server.stop()  # graceful: SIGTERM, the AOF is written
        server.start()
    wait_for(lambda: all(gone(pid) for pid in victims), timeout=10, what="the killed instance gone")
    result = whole.run("start", "-c", str(config), "--name", whole.name, "-d", "--log-file",
                       str(whole.dir / f"{whole.name}.log"), timeout=60)
    assert result.returncode == 0, result.stderr
    thread.join(timeout=seconds + 30)
    assert not failures, failures


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_no_job_lost_under_chaos(tmp_path, kind):
    run_chaos(tmp_path, kind, jobs=2000, workers=4, chaos_s=3.0)


@pytest.mark.soak
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_no_job_lost_under_chaos_soak(tmp_path, kind):
    run_chaos(tmp_path, kind, jobs=10_000, workers=10, chaos_s=20.0)


def test_python_api_takes_the_queue_options(tmp_path):
    from tprocess import ConfigError, Supervisor
    from tprocess.queue.serving import job_options

    def scan(ctx, job):
        pass

    bad = Supervisor("api", broker="ftp://host/x").add_group("ip", task=scan, queue="ip")
    with pytest.raises(ConfigError, match="unknown scheme 'ftp'"):
        bad.prepare()
    wrong = Supervisor("api", broker=f"sqlite://{tmp_path}/q.sqlite3").add_group(
        "ip", task=lambda ctx: None, queue="ip")
    with pytest.raises(ConfigError, match=r"two arguments \(ctx, job\)"):
        wrong.prepare()
    sup = Supervisor("api", broker=f"sqlite://{tmp_path}/q.sqlite3").add_group(
        "ip", task=scan, workers=2, queue="ip", job_timeout=5, max_retries=0)
    sup.prepare()  # the broker answered, and was closed again
    options = job_options(sup.config, sup.config.groups[0])
    assert (options.queue, options.job_timeout, options.max_retries, options.retry_delay) == ("ip", 5, 0, 1.0)
    assert options.broker_url == f"sqlite://{tmp_path}/q.sqlite3" and (tmp_path / "q.sqlite3").exists()
