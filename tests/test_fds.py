"""The master's descriptors never leak into a worker, however the numbers get reused.

The master holds its control socket, its selector, its wake-up and ready pipes, the
socket to its output process, and, for a moment around each fork, the new workers'
pipes; a freshly forked worker closes all of them (as runs of consecutive numbers,
tracked by the master's selector: fdranges.py). Respawns punch holes in the numbering
and fill them again: workers forked then must still close exactly the master's
descriptors and keep their own. The read ends of the workers' pipes are held by the
output process alone (collector.py), never by the master.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from chaos_support import children_of, output_process_of, signal_child
from e2e_support import FAST_RESPAWN
from helpers import TPROCESS, kill_pids, master_of, wait_for, workers_of

from tprocess.fdranges import FdRanges, merged

TASK = "def work(ctx):\n    ctx.sleep(0.2)\n"


def links(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def listener_of(name: str) -> str:
    """`socket:[INODE]` of the instance's control socket (abstract name, /proc/net/unix)."""
    with open("/proc/net/unix") as fh:
        for line in fh:
            fields = line.split()
            if fields[-1] == f"@tprocess:{os.getuid()}:{name}":
                return f"socket:[{fields[6]}]"
    raise AssertionError(f"no control socket for {name}")


def fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
        return next(int(line.split()[1], 8) for line in fh if line.startswith("flags:"))


def ready_pipe(master: int) -> str:
    """The one pipe every worker shares with the master by design: the ready pipe, whose both
    ends the master holds, its write end blocking (the wake-up pipe's is O_NONBLOCK)."""
    ends: dict[str, list[int]] = {}
    for fd, target in links(master).items():
        if target.startswith("pipe:"):
            ends.setdefault(target, []).append(fd)
    shared = [target for target, fds in ends.items() if len(fds) == 2
              and any(fd_flags(master, fd) & 3 == os.O_WRONLY and not fd_flags(master, fd) & os.O_NONBLOCK
                      for fd in fds)]
    assert len(shared) == 1, shared
    return shared[0]


def leaked_into(worker: int, master_links: set[str], listener: str, ready: str = "") -> set[str]:
    """Pipes and the selector of the master that the worker also holds, less its own fd
    1 and 2 (a pipe's two ends read the same `pipe:[INODE]`), and the control socket.
    (They share, by design, the report socket's sending end and the ready pipe's write end.)"""
    mine = links(worker)
    own = {mine.get(1), mine.get(2)}
    leaked = {target for target in mine.values()
              if (target.startswith(("pipe:", "anon_inode:")) and target in master_links
                  and target not in own) or target == listener}
    held = [fd for fd, target in mine.items() if target == ready]
    if len(held) == 1 and fd_flags(worker, held[0]) & 3 == os.O_WRONLY:
        leaked.discard(ready)  # its write end, once: allowed
    return leaked


@pytest.mark.timeout(90)
def test_workers_hold_none_of_the_masters_descriptors_across_respawns(inst):
    inst.write("jobs.py", TASK)
    inst.start("jobs.py:work", "-n", "12")
    workers = inst.wait_workers(12)
    master = inst.master().pid
    for round_ in range(3):  # kill a few: their numbers are reused by the next forks
        victims = random.Random(round_).sample(sorted(p.pid for p in workers.values()), 4)
        kill_pids(victims, signal.SIGKILL)
        workers = wait_for(lambda v=set(victims): (w := workers_of(inst.name, master)) and len(w) == 12
                           and not v & {p.pid for p in w.values()} and w, 20, what="12 replacements")
    master_links = set(links(master).values())
    listener = listener_of(inst.name)
    assert listener in master_links
    ready = ready_pipe(master)
    # no worker's pipe in the master (its own: the wake-up and the ready pipe); all of them
    # in the output process
    assert sum(t.startswith("pipe:") for t in master_links) == 2, master_links
    reader = output_process_of(inst.name, master)
    assert reader is not None
    read_ends = set(links(reader.pid).values())
    for proc in workers.values():
        own = links(proc.pid)
        assert {own[1], own[2]} <= read_ends, proc.title
        assert not {own[1], own[2]} & master_links, proc.title
    for proc in children_of(master):
        if proc.pid == reader.pid:  # its own selector reads the same `anon_inode:[eventpoll]`
            assert {t for t in read_ends if t.startswith("pipe:")} & master_links == set()
            assert listener not in read_ends
            continue
        assert leaked_into(proc.pid, master_links, listener, ready) == set(), proc.title
    assert inst.stop().returncode == 0


@pytest.mark.timeout(120)
def test_read_ends_waiting_for_a_stalled_output_process_stay_out_of_new_workers(inst):
    """Each new worker's read ends go to the output process in a message; while that process
    is stalled its socket fills (its send buffer: ~280 respawns' messages here) and the next
    ones wait in the master with their descriptors. Workers forked meanwhile close those too."""
    inst.write("jobs.py", TASK)
    inst.start("-c", str(inst.write("tprocess.toml", FAST_RESPAWN.format(name=inst.name))))
    master = inst.master().pid
    workers = inst.wait_workers(3)
    reader = wait_for(lambda: output_process_of(inst.name, master), 10, what="the output process")
    ready = ready_pipe(master)

    def master_pipes() -> set[str]:
        return {t for t in links(master).values() if t.startswith("pipe:")}

    own_pipes = master_pipes()  # its wake-up and ready pipes
    title = min(workers)
    assert signal_child(master, reader.pid, signal.SIGSTOP)  # our own instance's, by pid
    try:
        waited_before_fork, kills = False, 0
        deadline = time.monotonic() + 60
        while not waited_before_fork:  # until read ends wait in the master, then one fork more
            assert time.monotonic() < deadline, f"the output process's socket not full after {kills} respawns"
            waited_before_fork = bool(master_pipes() - own_pipes)
            victim = workers[title].pid
            kill_pids([victim])
            kills += 1
            workers = wait_for(lambda v=victim: (w := workers_of(inst.name, master)) and len(w) == 3
                               and w[title].pid != v and w, 10, what=f"the replacement after kill {kills}")
        master_links = set(links(master).values())
        listener = listener_of(inst.name)
        for proc in workers.values():
            assert leaked_into(proc.pid, master_links, listener, ready) == set(), proc.title
    finally:
        signal_child(master, reader.pid, signal.SIGCONT)
    wait_for(lambda: master_pipes() == own_pipes, 10, what="the waiting read ends sent")
    assert inst.stop().returncode == 0


def test_fd_ranges_match_a_plain_set():
    rng = random.Random(7)
    for _ in range(200):
        ranges, plain = FdRanges(), set()
        for _ in range(200):
            fd = rng.randrange(0, 50)
            if rng.random() < 0.55:
                ranges.add(fd)
                plain.add(fd)
            else:
                ranges.discard(fd)
                plain.discard(fd)
            runs = ranges.ranges()
            assert {fd for lo, hi in runs for fd in range(lo, hi)} == plain
            assert all(a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False))  # sorted, disjoint
            assert len(ranges) == len(plain)


def test_merged_runs_close_the_same_descriptors_in_fewer_calls():
    """What a child closes: the master's runs and a batch's pipes, joined where they touch."""
    rng = random.Random(11)
    for _ in range(500):
        starts = [rng.randrange(0, 60) for _ in range(rng.randrange(0, 12))]
        runs = [(lo, lo + rng.randrange(1, 5)) for lo in starts]
        joined = merged(runs)
        covered = {fd for lo, hi in runs for fd in range(lo, hi)}
        assert {fd for lo, hi in joined for fd in range(lo, hi)} == covered
        assert all(a[1] < b[0] for a, b in zip(joined, joined[1:], strict=False))  # sorted, apart
    batch = [(fd, fd + 1) for fd in range(40, 168)]  # 32 workers' 4 pipe ends, in the order opened
    assert merged([(3, 9), (12, 13), *batch]) == [(3, 9), (12, 13), (40, 168)]


def test_start_with_stderr_closed_puts_dev_null_there(inst):
    """Started with fd 2 closed (`2>&-`), the master would hand that number to the next pipe
    or socket it opens, and its log lines (to stderr without a log file) would land there:
    0, 1 and 2 are opened on /dev/null first."""
    inst.write("jobs.py", TASK)
    command = f"exec '{TPROCESS}' start jobs.py:work -n 2 --name {inst.name} 2>&-"
    proc = subprocess.Popen(["sh", "-c", command], cwd=inst.dir, stdout=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    inst.foreground.append(proc)
    workers = inst.wait_workers(2)
    master = master_of(inst.name)
    assert master is not None and master.pid == proc.pid
    assert links(master.pid)[2] == "/dev/null"
    assert all(links(w.pid)[2].startswith("pipe:") for w in workers.values())  # the worker's own stderr pipe
    assert inst.run("status").returncode == 0
    assert inst.stop().returncode == 0
    assert proc.wait(timeout=30) == 0
