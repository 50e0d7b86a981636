"""Not ours, not touched: processes titled like the instance that it did not start.

Decoys titled `PREFIX-master`, `PREFIX-0`, `PREFIX-1`, some run by another user
(nobody, uid 65534) and some by the same user outside tprocess, record every
signal they receive. `start` (with leftovers of a SIGKILLed master to clean up),
`status` and `stop` (of a running master and of leftovers) must never signal one.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from chaos_support import Decoy, alive, live_workers, signal_master, status_json
from e2e_support import read_records
from helpers import instance_procs, read_proc, wait_for

NOBODY = 65534

TASK = '''
import os, time

RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records.log")


def work(ctx):
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"S %d\\n" % os.getpid())
    time.sleep(2)
    os.write(fd, b"E %d\\n" % os.getpid())
    os.close(fd)
'''


def _start(inst) -> int:
    """start -d; the master's pid from its output (a decoy shares its title)."""
    started = inst.start("jobs.py:work", "-n", "2")
    return int(re.search(r"master pid (\d+)", started.stdout).group(1))


def _kill_master_leaving_busy_workers(inst, master: int) -> set[int]:
    """SIGKILL the master while its workers are mid-task: they become leftovers."""
    workers = wait_for(lambda: len(live_workers(inst.name, master)) == 2
                       and {p.pid for p in live_workers(inst.name, master).values()}, 10,
                       what="the two workers")
    records = inst.dir / "records.log"
    wait_for(lambda: workers <= {int(r[1]) for r in read_records(records) if r[0] == "S"}, 10,
             what="both workers in a task")
    signal_master(inst, master, signal.SIGKILL)
    wait_for(lambda: not alive(master), 5, what="the master to die")
    return workers


def _pids_named(text: str) -> set[int]:
    return {int(p) for p in re.findall(r"pid (\d+)", text)}


@pytest.mark.timeout(90)
def test_decoys_of_this_user_and_another_are_never_signalled(inst):
    inst.write("jobs.py", TASK)
    decoys: list[Decoy] = []
    try:
        for title, uid in [("master", None), ("0", None), ("master", NOBODY), ("0", NOBODY),
                           ("1", NOBODY)]:
            tag = "nobody" if uid else "same-user"
            decoys.append(Decoy(f"{inst.name}-{title}", inst.dir / f"decoy-{tag}-{title}.log", uid))
        decoy_pids = {d.pid for d in decoys}
        for d in decoys:
            proc = read_proc(d.pid)
            assert proc.title == d.title, proc
        assert {os.stat(f"/proc/{d.pid}").st_uid for d in decoys} == {os.getuid(), NOBODY}

        # not running: the decoys are neither a running master nor leftovers
        status = inst.run("status")
        assert status.returncode == 3 and "leftover" not in status.stdout, status.stdout
        stop = inst.stop()
        assert stop.returncode == 0 and "not running" in stop.stdout, stop.stdout

        # start beside the decoys; status shows the real master and workers only
        master = _start(inst)
        data = status_json(inst)
        assert data["master"]["pid"] == master and master not in decoy_pids
        assert not decoy_pids & {w["pid"] for w in data["workers"]}

        # the master dies mid-task: status lists its workers as leftovers, and start
        # cleans exactly those up
        leftovers = _kill_master_leaving_busy_workers(inst, master)
        status = inst.run("status")
        assert status.returncode == 3, status
        assert _pids_named(status.stdout) == leftovers, status.stdout
        again = inst.start("jobs.py:work", "-n", "2")
        assert "leftover" in again.stderr, "start found no leftovers: the test proves nothing"
        assert _pids_named(again.stderr) == leftovers, again.stderr
        assert not any(alive(pid) for pid in leftovers)
        master = int(re.search(r"master pid (\d+)", again.stdout).group(1))

        # stop a running master
        stopped = inst.stop()
        assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
        assert not decoy_pids & _pids_named(stopped.stdout + stopped.stderr)
        assert not alive(master)

        # stop leftovers of a killed master
        leftovers = _kill_master_leaving_busy_workers(inst, _start(inst))
        stopped = inst.stop()
        assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
        assert "leftover" in stopped.stdout, stopped.stdout
        assert _pids_named(stopped.stdout + stopped.stderr) == leftovers, stopped.stdout
        wait_for(lambda: not any(alive(pid) for pid in leftovers), 10, what="the leftovers to end")
        status = inst.run("status")
        assert status.returncode == 3 and "leftover" not in status.stdout, status.stdout

        for d in decoys:
            assert d.proc.poll() is None and alive(d.pid), f"decoy {d.title} ({d.pid}) died"
            assert d.signals() == [], f"decoy {d.title} ({d.pid}) was signalled: {d.signals()}"
        # what is left titled like the instance, for this user, is the same-user decoys only
        assert {p.pid for p in instance_procs(inst.name)} == {
            d.pid for d in decoys if os.stat(f"/proc/{d.pid}").st_uid == os.getuid()}
    finally:
        for d in decoys:
            d.kill()
