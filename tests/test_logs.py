"""Logs: every line names its process, worker exits are logged, the default log file."""

from __future__ import annotations

import glob
import os
import re
import signal

import pytest
from e2e_support import LOG_LINE
from helpers import instance_procs, wait_for, workers_of

CHATTY = '''
import os
import sys

MARK = {mark!r}


def work(ctx):
    if not getattr(ctx, "said", False):
        ctx.said = True
        ctx.log.info("hello from %s", ctx.name)
        if ctx.index == 0:
            raise ValueError("first task of worker 0 fails")
        if ctx.index == 1 and not os.path.exists(MARK):
            open(MARK, "w").close()
            sys.exit(5)
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_every_log_line_names_its_process_and_worker_exits_are_logged(inst):
    mark = inst.dir / "exited-once"
    inst.write("jobs.py", CHATTY.format(mark=str(mark)))
    inst.start("jobs.py:work", "-n", "3")
    master = inst.master()
    known = {(f"{inst.name}-master", master.pid)}
    t0, t1, t2 = (f"{inst.name}-{i}" for i in range(3))

    # worker 1 exits with code 5 once and is replaced
    first_w1 = wait_for(lambda: mark.exists() and re.search(
        rf"worker {t1} \(pid (\d+)\) exited with code 5 after", inst.read_log()), 10,
        what="worker 1's exit with code 5")
    workers = wait_for(lambda: len(workers_of(inst.name, master.pid)) == 3
                       and workers_of(inst.name, master.pid), 10, what="3 workers")
    known |= {(t, w.pid) for t, w in workers.items()} | {(t1, int(first_w1.group(1)))}
    wait_for(lambda: inst.read_log().count("hello from") >= 4, 10, what="the tasks' hellos")

    victim = workers[t2]
    os.kill(victim.pid, signal.SIGKILL)
    replacement = wait_for(lambda: (w := workers_of(inst.name, master.pid).get(t2))
                           and w.pid != victim.pid and w, 10, what="worker 2's replacement")
    known.add((t2, replacement.pid))
    final = workers_of(inst.name, master.pid)
    assert inst.stop().returncode == 0
    assert not instance_procs(inst.name)

    log = inst.read_log()
    lines = log.splitlines()
    assert lines, "empty log"
    seen = set()
    previous = None
    for number, line in enumerate(lines, 1):
        m = LOG_LINE.match(line)
        if m is None:
            # only a traceback may continue an ERROR record on the following lines
            assert previous is not None and previous["level"] == "ERROR", (number, line)
            continue
        previous = m
        who = (m["title"], int(m["pid"]))
        assert who in known, (number, line, known)
        seen.add(who)
    assert (f"{inst.name}-master", master.pid) in seen
    assert (t0, workers[t0].pid) in seen  # its hello and its traceback

    def said_by_master(text: str) -> bool:
        return any(m["title"] == f"{inst.name}-master" and text in m["message"]
                   for m in map(LOG_LINE.match, lines) if m)

    assert said_by_master(f"worker {t1} (pid {first_w1.group(1)}) exited with code 5 after")
    assert said_by_master(f"worker {t2} (pid {victim.pid}) was killed by SIGKILL after")
    for title, w in final.items():
        assert said_by_master(f"worker {title} (pid {w.pid}) exited with code 0 after")
    for title, w in workers.items():
        if title != t2:
            assert f"{title}[{w.pid}] INFO hello from {title}" in log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("via", ["XDG_STATE_HOME", "HOME"])
def test_default_log_file_is_in_the_users_state_folder(inst, via):
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(3600)\n")
    base = inst.dir / "home"
    base.mkdir()
    env = {"XDG_STATE_HOME": str(base / "state")} if via == "XDG_STATE_HOME" else {
        "HOME": str(base), "XDG_STATE_HOME": ""}
    expected = (base / "state" if via == "XDG_STATE_HOME" else base / ".local" / "state") \
        / "tprocess" / f"{inst.name}.log"
    result = inst.run("start", "jobs.py:work", "-n", "2", "-d", env=env)
    assert result.returncode == 0, (result.stdout, result.stderr)
    master = inst.master()
    inst.wait_workers(2)
    assert str(expected) in result.stdout
    assert expected.is_file()
    assert f"{inst.name}-master[{master.pid}] INFO" in expected.read_text()
    assert not glob.glob(f"/tmp/*{inst.name}*") and not glob.glob(f"/tmp/*/{inst.name}*")
    assert not (inst.dir / "tprocess.log").exists()
    assert inst.stop().returncode == 0
    assert "stopped: 2 workers exited" in expected.read_text()


PRINTING = '''
import sys


def work(ctx):
    if not getattr(ctx, "said", False):
        ctx.said = True
        print(f"print-from-{ctx.name}", flush=True)
        sys.stderr.write(f"stderr-from-{ctx.name}\\n")
        sys.stderr.flush()
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_task_output_in_the_daemon_log_names_its_process(inst):
    inst.write("jobs.py", PRINTING)
    inst.start("jobs.py:work", "-n", "2")
    workers = inst.wait_workers(2)
    wait_for(lambda: inst.read_log().count("-from-") >= 4, 10, what="the tasks' output")
    lines = inst.read_log().splitlines()
    assert inst.stop().returncode == 0
    for title, w in workers.items():
        for text in (f"print-from-{title}", f"stderr-from-{title}"):
            (line,) = [line for line in lines if text in line]
            assert f"{title}[{w.pid}]" in line, line


def test_ctx_log_takes_what_a_logging_logger_takes(capfd):
    """ctx.log is tprocess's own light logger (no `logging` in the master: issue 8); the calls a
    task makes on a logging.Logger work on it, and a log call never raises into the task."""
    from tprocess.logs import Logger

    log = Logger()  # writes to fd 2, as in a master started in the foreground
    log.info("plain %s %d", "args", 7, extra={"k": 1}, stack_info=False, stacklevel=2)
    log.debug("under the level: not written")
    log.setLevel("DEBUG")
    log.debug("now written")
    try:
        raise ValueError("boom")
    except ValueError as exc:
        log.exception("caught")
        log.error("given", exc_info=exc)
    log.warning("bad format %d", "not a number")  # swallowed, like logging's handleError
    err = capfd.readouterr().err
    assert re.search(r"\[\d+\] INFO plain args 7$", err, re.M), err
    assert "under the level" not in err and "DEBUG now written" in err
    assert err.count("ValueError: boom") == 2 and "ERROR caught" in err and "ERROR given" in err
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+\[\d+\] [A-Z]+ ", line)
               for line in err.splitlines()), err
