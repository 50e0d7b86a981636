"""Workers' output: whatever a worker writes to fd 1 or 2 reaches the log under its name;
SIGUSR1 reopens the log file.

Each test runs the real command, in a daemon and (where it differs) in the foreground,
and reads the log the master wrote.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import proc_state, status_json
from helpers import TPROCESS, Instance, gone, instance_procs, wait_for, workers_of

# The log's own format, with the levels of workers' output (OUT: fd 1, ERR: fd 2)
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<title>\S+)\[(?P<pid>\d+)\] "
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL|OUT|ERR) (?P<message>.*)$"
)


def parse(text: str) -> list[re.Match[str]]:
    """Every line of the log, parsed: a line out of format fails the test."""
    matches = []
    for number, line in enumerate(text.splitlines(), 1):
        m = LINE.match(line)
        assert m is not None, f"line {number} is not in the log's format: {line!r}"
        matches.append(m)
    return matches


def start_foreground(inst: Instance, *args: str, log: Path) -> subprocess.Popen[str]:
    """A foreground master whose stderr (its log, without --log-file) goes to a file we can poll."""
    with open(log, "w") as err:
        proc = subprocess.Popen([TPROCESS, "start", *args, "--name", inst.name], cwd=inst.dir,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    inst.foreground.append(proc)
    return proc


def start(inst: Instance, mode: str, *args: str) -> Path:
    """Start in a daemon or in the foreground; return the file the log goes to."""
    if mode == "daemon":
        inst.start(*args)
        return inst.log
    log = inst.dir / "foreground.err"
    start_foreground(inst, *args, log=log)
    return log


def stop(inst: Instance, mode: str) -> None:
    result = inst.stop()
    assert result.returncode == 0, (result.stdout, result.stderr)
    if mode == "foreground":
        (proc,) = inst.foreground
        assert proc.wait(timeout=30) == 0
    assert not instance_procs(inst.name)


SETUP_SAYS = """
import sys


def setup(ctx):
    print(f"setup-out-{ctx.name}")
    sys.stderr.write("".join(f"setup-err-{ctx.name}-{i}\\n" for i in range(1000)))  # ~30 kB


def work(ctx):
    ctx.sleep(3600)
"""


@pytest.mark.timeout(90)
def test_what_workers_write_before_the_output_process_exists_reaches_the_log(inst):
    """The output process is forked after the first workers (it then shares more of the
    master's memory): what they write in their setup waits in their pipes, then reaches
    the log with their title, none of it lost."""
    inst.write("jobs.py", SETUP_SAYS)
    (inst.dir / "tprocess.toml").write_text(
        f'name = "{inst.name}"\n[groups.g]\ntask = "jobs.py:work"\nsetup = "jobs.py:setup"\nworkers = 40\n')
    inst.start("-c", str(inst.dir / "tprocess.toml"))
    workers = inst.wait_workers(40)
    wait_for(lambda: inst.log.read_text().count("setup-err-") >= 40 * 1000, 30, what="every setup's output")
    lines = parse(inst.log.read_text())
    for title in workers:
        said = {m["message"]: m["level"] for m in lines if m["title"] == title}
        assert said.get(f"setup-out-{title}") == "OUT", (title, said)
        assert all(said.get(f"setup-err-{title}-{i}") == "ERR" for i in range(1000)), title
    assert inst.stop().returncode == 0


EVERY_KIND = '''
import ctypes
import os
import subprocess
import sys

libc = ctypes.CDLL(None, use_errno=True)


def work(ctx):
    if not getattr(ctx, "said", False):
        ctx.said = True
        name = ctx.name
        print(f"print-{name}")
        sys.stderr.write(f"sys-stderr-{name}\\n")
        os.write(2, f"os-write-2-{name}\\n".encode())
        data = f"libc-write-1-{name}\\n".encode()
        libc.write(1, data, len(data))
        os.system(f"echo system-echo-{name}")
        subprocess.run(["sh", "-c", f"echo child-out-{name}; echo child-err-{name} >&2"], check=True)
        ctx.log.info("record-%s", name)
        try:
            raise ValueError(f"failure-{name}")
        except ValueError:
            ctx.log.exception("traceback-%s", name)
        sys.stdout.write(f"last-words-{name}")  # no newline: written at the worker's exit
    ctx.sleep(3600)
'''

EXPECTED = {  # text -> level, for each worker
    "print-{}": "OUT", "sys-stderr-{}": "ERR", "os-write-2-{}": "ERR", "libc-write-1-{}": "OUT",
    "system-echo-{}": "OUT", "child-out-{}": "OUT", "child-err-{}": "ERR", "record-{}": "INFO",
    "traceback-{}": "ERROR", "ValueError: failure-{}": "ERROR",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["daemon", "foreground"])
def test_everything_a_worker_writes_is_prefixed_with_its_title(inst, mode):
    inst.write("jobs.py", EVERY_KIND)
    log = start(inst, mode, "jobs.py:work", "-n", "2")
    workers = inst.wait_workers(2)
    wait_for(lambda: log.read_text().count("ValueError: failure-") == 2, 20, what="every worker's output")
    stop(inst, mode)

    lines = parse(log.read_text())
    for title, w in workers.items():
        mine = [m for m in lines if m["title"] == title]
        assert mine and all(int(m["pid"]) == w.pid for m in mine), mine
        said = {m["message"]: m["level"] for m in mine}
        for text, level in EXPECTED.items():
            assert said.get(text.format(title)) == level, (text.format(title), said)
        # the traceback: every line of the record carries the full prefix, as ERROR
        traceback_lines = [m for m in mine if m["level"] == "ERROR"]
        assert any(m["message"] == "Traceback (most recent call last):" for m in traceback_lines)
        assert any('raise ValueError(f"failure-{name}")' in m["message"] for m in traceback_lines)
        assert said.get(f"last-words-{title}") == "OUT", "the partial line at exit was lost"
        # ... and it is written before the master logs the worker's exit
        messages = [m["message"] for m in lines]
        exited = next(i for i, m in enumerate(lines) if m["title"].endswith("-master")
                      and m["message"].startswith(f"worker {title} (pid {w.pid}) exited"))
        assert messages.index(f"last-words-{title}") < exited
    assert not any("\x1e" in m["message"] for m in lines), "a framed record leaked into the log"


LINE_THEN_HALF = '''
def work(ctx):
    if not getattr(ctx, "said", False):
        ctx.said = True
        print(f"whole-line-{ctx.name}")
        print(f"half-line-{ctx.name}", end="")
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_prints_arrive_line_by_line_without_pythonunbuffered(inst):
    """A pipe is block-buffered by Python: the workers' stdout is made line-buffered, so a
    whole line reaches the log at once without PYTHONUNBUFFERED (which the other tests set),
    and a half line waits for its newline or, as here, for the worker's exit."""
    inst.write("jobs.py", LINE_THEN_HALF)
    inst.start("jobs.py:work", "-n", "2", env={"PYTHONUNBUFFERED": ""})  # empty: not set, for Python
    workers = inst.wait_workers(2)
    for title in workers:
        wait_for(lambda t=title: f"whole-line-{t}" in inst.read_log(), 10, what=f"{title}'s whole line")
    assert "half-line-" not in inst.read_log()  # still in the worker's buffer: the exit writes it
    assert inst.stop().returncode == 0
    said = {(m["title"], m["message"], m["level"]) for m in parse(inst.read_log())}
    for title in workers:
        assert (title, f"whole-line-{title}", "OUT") in said
        assert (title, f"half-line-{title}", "OUT") in said, "the half line at exit was lost"


HALVES = '''
import os
import time

LONG = 40000


def work(ctx):
    name = ctx.name.encode()
    for n in range(4):
        line = b"%s:%d:" % (name, n) + name[-1:] * 3000 + b":end"
        half = len(line) // 2
        os.write(1, line[:half])  # half a line, then the other worker writes its half
        time.sleep(0.15)
        os.write(1, line[half:] + b"\\n")
        os.write(2, b"err-" + line[:half])
        time.sleep(0.1)
        os.write(2, line[half:] + b"\\n")
    os.write(1, b"long:" + b"y" * LONG + b":long\\n")
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_partial_lines_are_never_glued_to_another_workers(inst):
    inst.write("jobs.py", HALVES)
    inst.start("jobs.py:work", "-n", "2")
    workers = inst.wait_workers(2)
    wait_for(lambda: inst.read_log().count(":long") == 2, 20, what="every worker's lines")
    lines = parse(inst.read_log())
    assert inst.stop().returncode == 0

    for title, w in workers.items():
        mine = [m for m in lines if (m["title"], int(m["pid"])) == (title, w.pid)]
        wanted = [f"{title}:{n}:" + title[-1] * 3000 + ":end" for n in range(4)]
        assert [m["message"] for m in mine if m["level"] == "OUT" and ":end" in m["message"]] == wanted
        assert [m["message"] for m in mine if m["level"] == "ERR"] == ["err-" + x for x in wanted]
        # a 40,000-character line comes in pieces of at most 16 KiB, each with the full prefix
        pieces = [m["message"] for m in mine if m["level"] == "OUT" and ":end" not in m["message"]]
        assert all(len(p) <= 16384 for p in pieces) and len(pieces) == 3, [len(p) for p in pieces]
        assert "".join(pieces) == "long:" + "y" * 40000 + ":long"
    others = set(workers)
    for m in lines:  # no line holds two workers' text
        assert sum(t + ":" in m["message"] for t in others) <= 1, m["message"][:200]


FLOOD = '''
def work(ctx):
    if ctx.index == 0:
        n = 0
        while not ctx.stopping:
            n += 1
            print("flood", n)
    else:
        ctx.sleep(3600)
'''


@pytest.mark.timeout(90)
def test_a_flooding_worker_does_not_stall_the_master(inst):
    inst.write("jobs.py", FLOOD)
    inst.start("jobs.py:work", "-n", "3")
    master = inst.master()
    workers = inst.wait_workers(3)
    wait_for(lambda: inst.log.stat().st_size > 1_000_000, 20, what="the flood in the log")

    victim = workers[f"{inst.name}-1"]
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)  # our own worker, by pid
    replacement = wait_for(lambda: (w := workers_of(inst.name, master.pid).get(f"{inst.name}-1"))
                           and w.pid != victim.pid and w, 10, what="the killed worker's replacement")
    respawn = time.monotonic() - killed_at
    asked = time.monotonic()
    status = status_json(inst)
    answered = time.monotonic() - asked
    by_name = {w["name"]: w for w in status["workers"]}
    assert by_name[f"{inst.name}-1"]["pid"] == replacement.pid
    assert by_name[f"{inst.name}-0"]["pid"] == workers[f"{inst.name}-0"].pid  # still flooding

    asked = time.monotonic()
    result = inst.stop()
    took = time.monotonic() - asked
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert not instance_procs(inst.name)
    size = inst.log.stat().st_size
    print(f"\nflood: respawn seen after {respawn * 1000:.0f} ms, status in {answered * 1000:.0f} ms, "
          f"stop in {took * 1000:.0f} ms, log {size / 1e6:.1f} MB")
    assert respawn < 3.0 and answered < 5.0 and took < 10.0
    tail = inst.read_log().splitlines()[-5:]
    assert any("stopped: 3 workers exited, 0 killed" in line for line in tail), tail


TICKS = '''
def work(ctx):
    ctx.n = getattr(ctx, "n", 0) + 1
    print(f"tick {ctx.n}")
    ctx.sleep(0.05)
'''


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["daemon", "foreground"])
def test_sigusr1_reopens_the_log_file(inst, mode):
    inst.write("jobs.py", TICKS)
    if mode == "daemon":
        inst.start("jobs.py:work", "-n", "2")
    else:
        start_foreground(inst, "jobs.py:work", "-n", "2", "--log-file", str(inst.log),
                         log=inst.dir / "foreground.err")
    workers = inst.wait_workers(2)
    master = inst.master()
    wait_for(lambda: inst.read_log().count("OUT tick") >= 4, 10, what="ticks in the log")

    rotated = inst.dir / "tprocess.log.1"
    inst.log.rename(rotated)  # what logrotate does first
    # a SIGUSR1 meant for the master and hitting a worker must not end it
    w0 = workers[f"{inst.name}-0"]
    os.kill(w0.pid, signal.SIGUSR1)
    os.kill(master.pid, signal.SIGUSR1)
    wait_for(lambda: "reopened the log file" in inst.read_log(), 10, what="the reopened log")
    size_after_reopen = rotated.stat().st_size
    # new lines, from the master and from each worker, land in the new file
    wait_for(lambda: all(f"{t}[{w.pid}] OUT tick" in inst.read_log() for t, w in workers.items()),
             10, what="ticks of every worker in the new file")
    assert proc_state(w0.pid) not in (None, "Z")
    stop(inst, mode)

    new = inst.read_log()
    old = rotated.read_text()
    assert rotated.stat().st_size == size_after_reopen, "the renamed file was still written to"
    assert "reopened the log file" not in old and "stopped: 2 workers exited" in new
    parse(new)
    assert f"{inst.name}-master[{master.pid}] INFO reopened the log file {inst.log}" in new
    assert all(f"{t}[{w.pid}] OUT tick" in old for t, w in workers.items())


PRINT_AFTER_STOP = '''
import os
import time

RECORDS = {records!r}


def record(text):
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{{text}} {{os.getpid()}}\\n".encode())
    os.close(fd)


def work(ctx):
    record("start")
    time.sleep(1.0)  # the master is killed here
    try:
        for n in range(3):
            print("still printing", n)
            ctx.log.info("still logging %d", n)
        record("printed")
    except BaseException as exc:
        record(f"failed-{{type(exc).__name__}}")
        raise
'''


@pytest.mark.timeout(60)
def test_workers_of_a_dead_master_can_still_print(inst):
    records = inst.dir / "records.txt"
    inst.write("jobs.py", PRINT_AFTER_STOP.format(records=str(records)))
    inst.start("jobs.py:work", "-n", "2")
    master = inst.master()
    workers = inst.wait_workers(2)
    pids = {w.pid for w in workers.values()}
    wait_for(lambda: records.exists() and {int(x.split()[1]) for x in records.read_text().splitlines()}
             >= pids, 10, what="both workers in a task")
    os.kill(master.pid, signal.SIGKILL)  # our own master, by pid
    wait_for(lambda: all(gone(pid) for pid in pids), 20, what="the workers to finish and exit")
    done = [line.split() for line in records.read_text().splitlines()]
    assert not [r for r in done if r[0].startswith("failed")], done
    assert {int(r[1]) for r in done if r[0] == "printed"} == pids, done


IDLE = "def work(ctx):\n    ctx.sleep(3600)\n"


def limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit")


@pytest.mark.timeout(60)
def test_the_open_file_limit_is_raised_for_the_master_only(inst):
    _, hard = limits(os.getpid())
    if hard < 1000:
        pytest.skip(f"hard open-file limit {hard} is too low to raise")
    inst.write("jobs.py", IDLE)
    shell = 'ulimit -Sn 100 && exec "$@"'
    result = subprocess.run(["sh", "-c", shell, "sh", TPROCESS, "start", "jobs.py:work", "-n", "60",
                             "-d", "--name", inst.name, "--log-file", str(inst.log)],
                            cwd=inst.dir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.stdout, result.stderr)
    master = inst.master()
    workers = inst.wait_workers(60)
    assert limits(master.pid) == (hard, hard)
    assert {limits(w.pid) for w in workers.values()} == {(100, hard)}  # as they were given
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_too_many_workers_for_the_open_file_limit_is_one_clear_line(inst):
    inst.write("jobs.py", IDLE)
    shell = 'ulimit -Sn 150 && ulimit -Hn 150 && exec "$@"'
    result = subprocess.run(["sh", "-c", shell, "sh", TPROCESS, "start", "jobs.py:work", "-n", "100",
                             "-d", "--name", inst.name, "--log-file", str(inst.log)],
                            cwd=inst.dir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith("tprocess: error: 100 workers need about") and "limit (ulimit -n) is 150" in line
    assert not instance_procs(inst.name)
    assert not inst.log.exists() or not inst.read_log()


@pytest.mark.timeout(60)
def test_a_killed_output_process_is_replaced_and_so_are_the_workers_it_read(inst):
    """The read ends of the workers' pipes live in NAME-output alone (the master holds none):
    if it dies, the master starts another and replaces the workers at a task boundary, and
    their output reaches the log again."""
    from chaos_support import assert_zombies_reaped, output_process_of, signal_child

    inst.write("jobs.py", TICKS)
    inst.start("jobs.py:work", "-n", "3")
    master = inst.master()
    workers = inst.wait_workers(3)
    wait_for(lambda: "OUT tick 2" in inst.read_log(), 10, what="the workers' output in the log")

    def output_process() -> int | None:
        reader = output_process_of(inst.name, master.pid)
        return reader.pid if reader else None

    old = wait_for(output_process, 5, what="the output process")
    assert signal_child(master.pid, old, signal.SIGKILL)  # our own instance's, by pid
    new = wait_for(lambda: (pid := output_process()) != old and pid, 10, what="another output process")
    replaced = wait_for(lambda: (w := workers_of(inst.name, master.pid)) and len(w) == 3
                        and not {p.pid for p in w.values()} & {p.pid for p in workers.values()} and w,
                        20, what="the three workers replaced")
    fresh = {str(p.pid) for p in replaced.values()}
    wait_for(lambda: fresh <= {m["pid"] for m in parse(inst.read_log())
                               if m["level"] == "OUT" and m["message"].startswith("tick")},
             10, what="the new workers' output in the log")
    (group,) = status_json(inst)["groups"]
    assert group["restarts"]["output"] == 3 and group["restarts"]["crash"] == 0, group
    log = inst.read_log()
    assert f"{inst.name}-output (pid {old}) was killed by SIGKILL: starting another" in log, log[-2000:]
    assert "replacing 3 workers at their next task boundary" in log
    assert output_process() == new
    assert_zombies_reaped(master.pid)
    result = inst.stop()
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert not instance_procs(inst.name)


def test_descriptors_pass_to_the_output_process_intact():
    """collector's send_fds/receive_fds (SCM_RIGHTS on the C socket type, without socket.py):
    each descriptor arrives, in order, as a new one reading the same pipe."""
    import _socket

    from tprocess.collector import FDS_MAX, receive_fds, send_fds

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(FDS_MAX)]
    try:
        send_fds(ours, b"W batch", [r for r, _ in pipes])
        data, fds = receive_fds(theirs, 1024, FDS_MAX)
        assert data == b"W batch" and len(fds) == FDS_MAX
        assert not {r for r, _ in pipes} & set(fds)  # new descriptors, the senders' still open
        for i, (fd, (_, w)) in enumerate(zip(fds, pipes, strict=True)):
            os.write(w, b"%d" % i)
            assert os.read(fd, 16) == b"%d" % i
            os.close(fd)
        ours.send(b"L no descriptors")
        assert receive_fds(theirs, 1024, FDS_MAX) == (b"L no descriptors", [])
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        ours.close()
        theirs.close()
