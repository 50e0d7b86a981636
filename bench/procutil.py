"""/proc helpers, the record-file tail, and the harness's own child reaper.

This machine's PID 1 does not reap orphans, so daemonised masters and their
workers would stay zombies forever.  The harness therefore makes itself a child
subreaper (PR_SET_CHILD_SUBREAPER): orphans of the trees it started are
reparented to it, and Reaper reaps them (never a pid owned by a Popen).
"""

import ctypes
import os
import signal
import subprocess
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PR_SET_CHILD_SUBREAPER = 36


def first_starts(records):
    """pid -> monotonic ns of its first task start, from a records file (S PID NS lines)."""
    starts = {}
    try:
        with open(records) as fh:
            for line in fh:
                kind, pid, ns = line.split()[:3]
                if kind == "S":
                    starts.setdefault(int(pid), int(ns))
    except FileNotFoundError:
        pass
    return starts


def children_of(pid):
    """The pids whose parent is pid (the kernel's list: no scan of /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def read_stat(pid):
    """(state, ppid, utime+stime ticks, starttime) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    # rest[0]=state rest[1]=ppid ... utime=rest[11] stime=rest[12] starttime=rest[19]
    return rest[0].decode(), int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])


def alive(pid):
    """Running (exists and not a zombie)."""
    st = read_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def all_procs():
    """{pid: (state, ppid)} for every process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st:
                out[int(name)] = (st[0], st[1])
    return out


def children(pid, procs=None):
    procs = procs if procs is not None else all_procs()
    return {p: s for p, (s, pp) in procs.items() if pp == pid}


def descendants(pid, procs=None):
    procs = procs if procs is not None else all_procs()
    by_parent = {}
    for p, (_, pp) in procs.items():
        by_parent.setdefault(pp, []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in by_parent.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def find_by_cmdline(text, procs=None):
    procs = procs if procs is not None else all_procs()
    return [p for p, (s, _) in procs.items() if s != "Z" and cmdline(p) == text]


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_ticks(pid):
    st = read_stat(pid)
    return None if st is None else st[2]


class Reaper:
    """Subreaper + reaping thread for the harness's orphaned descendants.

    Peeks with waitid(WNOWAIT): a Popen's own child is handed to Popen.poll()
    (keeps its return code), any other zombie child is reaped with waitpid."""

    def __init__(self):
        self.lock = threading.Lock()
        self.popens = {}
        self.enabled = False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.enabled = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except OSError:
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def popen(self, *args, **kw):
        with self.lock:
            p = subprocess.Popen(*args, **kw)
            self.popens[p.pid] = p
        return p

    def run(self, *args, **kw):
        """subprocess.run, with the reaper held off so it cannot steal the exit status."""
        with self.lock:
            return subprocess.run(*args, **kw)

    def reap(self):
        with self.lock:
            for _ in range(10000):
                try:
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    return
                if info is None:
                    return
                p = self.popens.get(info.si_pid)
                if p is not None:
                    if p.poll() is None:
                        return  # another thread is in p.wait(); retry next tick
                    del self.popens[info.si_pid]
                else:
                    try:
                        os.waitpid(info.si_pid, os.WNOHANG)
                    except ChildProcessError:
                        pass

    def _loop(self):
        while not self._stop.wait(0.01):
            try:
                self.reap()
            except Exception:
                pass

    def close(self):
        self._stop.set()


REAPER = None


def run(*args, **kw):
    if REAPER is not None:
        return REAPER.run(*args, **kw)
    return subprocess.run(*args, **kw)


class Records:
    """Incremental reader of the BENCH_RECORDS file."""

    def __init__(self, path):
        self.path = path
        self.off = 0
        self.buf = b""
        self.first_s = {}  # pid -> ns of its first S
        self.s_count = {}
        self.e_count = {}
        self.c_recs = []  # (pid, calls, ns)
        self.order = []  # pids in order of first S

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self.off += len(data)
        data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        for ln in lines:
            parts = ln.split()
            if len(parts) < 3:
                continue
            kind, pid = parts[0], int(parts[1])
            if kind == b"S":
                if pid not in self.first_s:
                    self.first_s[pid] = int(parts[2])
                    self.order.append(pid)
                self.s_count[pid] = self.s_count.get(pid, 0) + 1
            elif kind == b"E":
                self.e_count[pid] = self.e_count.get(pid, 0) + 1
            elif kind == b"C" and len(parts) >= 4:
                self.c_recs.append((pid, int(parts[2]), int(parts[3])))

    def cut_tasks(self, pids):
        return sum(max(0, self.s_count.get(p, 0) - self.e_count.get(p, 0)) for p in pids)


def wait_until(pred, timeout, interval=0.003):
    """Poll pred() until true or deadline; returns pred's last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def kill_verified(pid, starttime, sig=signal.SIGKILL):
    """Signal pid only if it is still the same process (same starttime)."""
    st = read_stat(pid)
    if st is None or st[3] != starttime or st[0] == "Z":
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
