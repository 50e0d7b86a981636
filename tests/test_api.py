"""The Python API: tprocess.Supervisor built and run from a script, stopped by the command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from helpers import gone, instance_procs, wait_for

SCRIPT = '''
import os
import sys

import tprocess

NAME, RECORDS = sys.argv[1], sys.argv[2]


def record(kind, ctx):
    line = f"{{kind}} {{os.getpid()}} {{ctx.name}}\\n"
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def open_db(ctx):
    record("setup", ctx)


def close_db(ctx):
    record("teardown", ctx)


def scan(ctx):
    ctx.sleep(3600)


sup = tprocess.Supervisor(NAME, graceful_timeout=5)
sup.add_group("ip", task=scan, workers=3, setup=open_db, teardown=close_db)
sup.add_group("domain", task=scan, workers=2, setup=open_db, teardown=close_db)
code = sup.run()
with open(RECORDS + ".result", "w") as fh:
    fh.write(f"run returned {{code!r}} in {{os.getpid()}}\\n")
sys.exit(code)
'''


@pytest.mark.timeout(60)
def test_supervisor_api_run_titles_and_stop(inst):
    script = inst.write("app.py", SCRIPT.format())
    records = inst.dir / "records.txt"
    proc = subprocess.Popen([sys.executable, str(script), inst.name, str(records)],
                            cwd=inst.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    inst.foreground.append(proc)
    workers = inst.wait_workers(5)
    master = inst.master()
    assert master.pid == proc.pid  # run() turns the calling process into the master
    assert sorted(workers) == sorted(
        [f"{inst.name}-ip-{i}" for i in range(3)] + [f"{inst.name}-domain-{i}" for i in range(2)]
    )
    with open(f"/proc/{master.pid}/cmdline", "rb") as fh:
        assert fh.read().rstrip(b"\0") == f"{inst.name}-master".encode()
    wait_for(lambda: records.exists() and records.read_text().count("setup") == 5, 10,
             what="setup in each worker")

    result = inst.run("stop")  # `tprocess stop --name NAME`
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"{inst.name}-master (pid {proc.pid})" in result.stdout
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (inst.dir / "records.txt.result").read_text() == f"run returned 0 in {proc.pid}\n"
    assert all(gone(w.pid) for w in workers.values())
    assert not instance_procs(inst.name)

    rows = [line.split() for line in records.read_text().splitlines()]
    pids = {w.pid: t for t, w in workers.items()}
    for kind in ("setup", "teardown"):
        assert Counter(int(r[1]) for r in rows if r[0] == kind) == Counter(list(pids)), rows
        assert all(pids[int(r[1])] == r[2] for r in rows if r[0] == kind)
    assert os.getpid() not in {int(r[1]) for r in rows}
