#!/usr/bin/env python
"""tprocess benchmark harness.

    .venv/bin/python bench/run.py [--quick] [--out BENCHMARKS.md] [--only floor,tprocess,...]

Installs supervisor + circus (+ matplotlib) into bench/.work/venv and PM2 into
bench/.work/npm, then runs floor, tprocess, supervisord, circus and PM2 interleaved
(A B C D E, A B C D E, ...) and reports medians.  Every process it starts is
cleaned up by pid (its own tree only).  See bench/README.md for the definitions.
"""

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import contestants as cs  # noqa: E402
import procutil as pu  # noqa: E402
import setup_env as se  # noqa: E402

REPO = os.path.dirname(BENCH)
RUNS = os.path.join(se.WORK, "runs")

MODES = {
    "full": dict(start_ns=[5, 100, 500, 2000], busy_ns=[5, 100], reps=3, cpu_s=10.0, kills=20,
                 scale_kills=9, budget_s=1150),
    "quick": dict(start_ns=[5, 100], busy_ns=[5], reps=2, cpu_s=3.0, kills=8, scale_kills=4,
                  budget_s=230),
}
RES_N = 100  # N for CPU / memory / respawn / zombies
PEERS_MAX_N = 500  # the exec'd peers take a minute or more per pool past this: floor and tprocess only
# measured at every N: respawn and memory (the scale figures)
FORKERS = ("floor", "tprocess", "base", "floor+imports")
SETTLE_S = 0.5  # idle time after a pool is up, before it is measured or stopped
STOP_TIMEOUT_BUSY = 30.0


class RunError(Exception):
    pass


def start_timeout(n):
    return 20 + 0.2 * n


def stop_timeout(n):
    return 20 + 0.2 * n


def log(msg):
    print(msg, flush=True)


class Harness:
    def __init__(self, args):
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.cfg = dict(MODES[self.mode])
        if args.ns:
            self.cfg["start_ns"] = [int(x) for x in args.ns.split(",")]
        if args.reps:
            self.cfg["reps"] = args.reps
        if args.no_extra:
            self.cfg["busy_ns"] = []
        self.reaper = pu.Reaper()
        pu.REAPER = self.reaper
        self.rng = random.Random(20240601)
        self.samples = {}  # contestant -> metric -> [values]
        self.errors = {}  # contestant -> [messages]
        self.warnings = []
        self.live_pools = []
        self.seq = 0
        self.t_begin = time.monotonic()
        self.contestants = []

    # ------------------------------------------------------------ bookkeeping
    def add(self, c, metric, value):
        self.samples.setdefault(c.name, {}).setdefault(metric, []).append(value)

    def err(self, c, what, e):
        msg = f"{what}: {e}" if isinstance(e, RunError) else f"{what}: {type(e).__name__}: {e}"
        self.errors.setdefault(c.name, []).append(msg)
        log(f"    ! {c.name} {msg}")

    def elapsed(self):
        return time.monotonic() - self.t_begin

    # ------------------------------------------------------------ one pool
    def new_pool(self, c, n, mode):
        self.seq += 1
        d = os.path.join(RUNS, f"{self.seq:03d}{c.name[:4]}")
        pool = cs.Pool(c, n, mode, d, self.reaper)
        self.live_pools.append(pool)
        return pool

    def bring_up(self, pool):
        """Start the pool; returns (start_s, start_cmd_s).  Waits for N distinct S."""
        c, n = pool.c, pool.n
        t0 = time.monotonic_ns()
        c.start(pool)
        end = time.monotonic() + start_timeout(n)
        rec = pool.records
        while True:
            rec.poll()
            if len(rec.first_s) >= n:
                break
            rc = pool.launcher.poll()
            if rc not in (None, 0):
                raise RunError(f"start command exit {rc}: {pool.err_tail()}")
            if time.monotonic() > end:
                raise RunError(f"start timeout: {len(rec.first_s)}/{n} workers after "
                               f"{start_timeout(n):.0f} s {pool.err_tail()}")
            time.sleep(0.003)
        start_s = (sorted(rec.first_s.values())[n - 1] - t0) / 1e9
        if not c.find_master(pool, 20):
            raise RunError("master pid not found")
        if c.foreground:
            start_cmd_s = start_s
        elif not pu.wait_until(lambda: pool.launcher.poll() is not None, 60, 0.005):
            raise RunError("start command did not return within 60 s")
        else:
            start_cmd_s = (time.monotonic_ns() - t0) / 1e9
        if not c.foreground and pool.launcher.returncode != 0:
            raise RunError(f"start command exit {pool.launcher.returncode}: {pool.err_tail()}")
        pool.ready_at = time.monotonic()
        pool.snapshot()
        return start_s, start_cmd_s

    def stop_pool(self, pool, timeout):
        """Issue the stop; returns (stop_s, stop_cmd_rc, cut_tasks)."""
        c = pool.c
        pool.records.poll()
        pids = pool.snapshot()
        if not pids:
            raise RunError("pool master died before the stop")
        t0 = time.monotonic_ns()
        pool.stopper = c.stop(pool)
        end = time.monotonic() + timeout
        pending = sorted(pids)
        while pending:
            if not pu.alive(pending[-1]):
                pending.pop()
                continue
            if time.monotonic() > end:
                raise RunError(f"stop timeout: {len(pending)} of {len(pids)} processes still alive "
                               f"after {timeout:.0f} s")
            time.sleep(0.002)
        stop_s = (time.monotonic_ns() - t0) / 1e9
        rc = None
        pool.stop_cmd_s = stop_s
        if pool.stopper is not None:
            if pu.wait_until(lambda: pool.stopper.poll() is not None, 30, 0.005):
                rc = pool.stopper.returncode
                pool.stop_cmd_s = (time.monotonic_ns() - t0) / 1e9
            else:
                self.warnings.append(f"{c.name}: stop command still running 30 s after the pool died")
        pool.records.poll()
        cut = pool.records.cut_tasks(pids)
        pool.stopped_ok = True
        return stop_s, rc, cut

    def finish(self, pool):
        """Verify every process the pool ever had is gone; force-clean otherwise."""
        def leftovers():
            return [p for p, st in pool.known.items()
                    if (s := pu.read_stat(p)) and s[3] == st and s[0] != "Z"]
        ok = getattr(pool, "stopped_ok", False)
        if ok:  # a normal stop: give the commands a moment to return
            for p in (pool.launcher, getattr(pool, "stopper", None)):
                if p is not None and p.poll() is None:
                    pu.wait_until(lambda p=p: p.poll() is not None, 5, 0.01)
        left = leftovers()
        if not ok or left or (pool.launcher is not None and pool.launcher.poll() is None):
            pool.c.force_cleanup(pool)
            if not pu.wait_until(lambda: not leftovers(), 10, 0.01):
                self.warnings.append(f"{pool.c.name}: pids {leftovers()} survived SIGKILL")
            elif ok and left:
                self.warnings.append(f"{pool.c.name}: {len(left)} process(es) left after its "
                                     f"stop, SIGKILLed by the harness")
        pool.closed = True
        if pool in self.live_pools:
            self.live_pools.remove(pool)

    def settle(self, pool, seconds=SETTLE_S):
        left = pool.ready_at + seconds - time.monotonic()
        if left > 0:
            time.sleep(left)  # a fixed idle period is the measurement condition itself

    # ------------------------------------------------------------ measurements
    def run_idle(self, c, n, kills=0):
        pool = self.new_pool(c, n, "idle")
        try:
            start_s, cmd_s = self.bring_up(pool)
            self.add(c, f"start_{n}", start_s)
            self.add(c, f"start_cmd_{n}", cmd_s)
            if n == RES_N:
                self.resources(pool)
                if kills:
                    self.respawn(pool, kills)
            elif c.name in FORKERS:
                self.settle(pool)
                self.memory(pool, f"_{n}")
                self.respawn(pool, min(self.cfg["scale_kills"], n - 1), f"_{n}")  # originals only
            self.settle(pool)
            stop_s, rc, cut = self.stop_pool(pool, stop_timeout(n))
            self.add(c, f"stop_idle_{n}", stop_s)
            self.add(c, f"cut_idle_{n}", cut)
            self.add(c, f"stop_cmd_idle_{n}", pool.stop_cmd_s)
            if rc is not None:
                self.add(c, f"stop_rc_idle_{n}", rc)
            log(f"    {c.name:12s} N={n:<4d} start {start_s*1e3:8.1f} ms (cmd {cmd_s*1e3:8.1f}) "
                f"stop {stop_s*1e3:8.1f} ms rc={rc}")
        except Exception as e:  # noqa: BLE001  (RunError or anything unexpected)
            self.err(c, f"idle N={n}", e)
        finally:
            self.finish(pool)

    def run_busy(self, c, n):
        pool = self.new_pool(c, n, "busy")
        try:
            self.bring_up(pool)
            last = max(pool.records.first_s.values())
            wait = (last + 1_000_000_000 - time.monotonic_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)  # mid-way through the last worker's 2 s task
            stop_s, rc, cut = self.stop_pool(pool, STOP_TIMEOUT_BUSY)
            self.add(c, f"stop_busy_{n}", stop_s)
            self.add(c, f"cut_busy_{n}", cut)
            if rc is not None:
                self.add(c, f"stop_rc_busy_{n}", rc)
            log(f"    {c.name:12s} N={n:<4d} busy stop {stop_s*1e3:8.1f} ms cut={cut} rc={rc}")
        except Exception as e:  # noqa: BLE001  (RunError or anything unexpected)
            self.err(c, f"busy N={n}", e)
        finally:
            self.finish(pool)

    def run_empty(self, c):
        pool = self.new_pool(c, 1, "empty")
        try:
            self.bring_up(pool)
            ok = pu.wait_until(lambda: (pool.records.poll(), pool.records.c_recs)[1], 30, 0.01)
            if not ok:
                raise RunError("no rate report within 30 s")
            _, calls, ns = pool.records.c_recs[0]
            rate = calls / (ns / 1e9)
            self.add(c, "empty_rate", rate)
            self.stop_pool(pool, 20)
            log(f"    {c.name:12s} empty task loop {rate:,.0f} tasks/s")
        except Exception as e:  # noqa: BLE001  (RunError or anything unexpected)
            self.err(c, "empty", e)
        finally:
            self.finish(pool)

    def resources(self, pool):
        c, master = pool.c, pool.master
        self.settle(pool)
        a, ta = pu.cpu_ticks(master), time.monotonic()
        time.sleep(self.cfg["cpu_s"])  # fixed measurement window
        b, tb = pu.cpu_ticks(master), time.monotonic()
        if a is None or b is None:
            raise RunError("master died during the CPU window")
        self.add(c, "cpu_pct", (b - a) / pu.CLK_TCK / (tb - ta) * 100)
        self.memory(pool)
        if c.name in FORKERS:
            self.memory(pool, f"_{pool.n}")

    def memory(self, pool, suffix=""):
        c, master = pool.c, pool.master
        procs = pu.all_procs()
        workers = pool.workers(procs)
        self.add(c, f"rss_mib{suffix}", (pu.rss_kib(master) or 0) / 1024)
        self.add(c, f"pss_mib{suffix}", sum(pu.pss_kib(w) or 0 for w in workers) / 1024)
        self.add(c, f"pss_master_mib{suffix}", (pu.pss_kib(master) or 0) / 1024)
        self.add(c, f"nworkers{suffix}", len(workers))

    def respawn(self, pool, kills, suffix=""):
        """suffix "": the N=RES_N series, with zombie sampling; "_N": the scale series
        (no zombie sampling: reading /proc for thousands of processes would disturb it)."""
        c, master = pool.c, pool.master
        rec = pool.records
        procs = pu.all_procs()
        original = set(pool.workers(procs))
        pool.snapshot(procs)
        zmax = 0
        last_z = [0.0]

        def zsample(force=False):
            nonlocal zmax
            if suffix:
                return 0
            now = time.monotonic()
            if not force and now - last_z[0] < 0.02:
                return None
            last_z[0] = now
            z = sum(1 for s in pu.children(master).values() if s == "Z")
            zmax = max(zmax, z)
            return z

        for _ in range(kills):
            end = time.monotonic() + self.rng.uniform(0.1, 0.4)  # random gap
            while time.monotonic() < end:
                zsample()
                time.sleep(0.005)
            cands = []
            for p in sorted(original):
                st = pu.read_stat(p)
                if st and st[0] != "Z" and st[1] == master:
                    cands.append((p, st[3]))
            if not cands:
                raise RunError("no original worker left to kill")
            rec.poll()
            # only a process that runs tasks (tprocess's output process is a child too)
            cands = [(p, st) for p, st in cands if p in rec.first_s] or cands
            victim, vstart = self.rng.choice(cands)
            k = len(rec.order)
            t0 = time.monotonic_ns()
            if not pu.kill_verified(victim, vstart):
                continue
            deadline = time.monotonic() + 30
            while True:
                rec.poll()
                if len(rec.order) > k:
                    new = rec.order[k]
                    self.add(c, f"respawn_ms{suffix}", (rec.first_s[new] - t0) / 1e6)
                    if suffix == "" and c.name in FORKERS:
                        self.add(c, f"respawn_ms_{pool.n}", (rec.first_s[new] - t0) / 1e6)
                    break
                if time.monotonic() > deadline:
                    self.err(c, "respawn", "no new worker within 30 s of a SIGKILL")
                    break
                zsample()
                time.sleep(0.002)
        if suffix:
            pool.snapshot()
            return
        # zombies after the series: sampled for 1 s, the last sample counts
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            zsample()
            time.sleep(0.01)
        self.add(c, "zombies_during", zmax)
        self.add(c, "zombies_after", zsample(force=True))
        pool.snapshot()

    # ------------------------------------------------------------ driver
    def smoke(self, c):
        pool = self.new_pool(c, 2, "idle")
        try:
            self.bring_up(pool)
            self.stop_pool(pool, 30)
        finally:
            self.finish(pool)

    def setup(self):
        os.makedirs(se.WORK, exist_ok=True)
        shutil.rmtree(RUNS, ignore_errors=True)
        os.makedirs(RUNS)
        inst_log = os.path.join(se.WORK, "install.log")
        only = set(self.args.only.split(",")) if self.args.only else None
        for cls in cs.ALL:
            c = cls()
            if (only and c.name not in only) or (c.name in cs.OPT_IN and not (only and c.name in only)):
                continue
            t = time.monotonic()
            try:
                c.setup(inst_log)
                self.smoke(c)
            except Exception as e:  # noqa: BLE001
                c.available, c.reason = False, str(e)
            if c.available and c.cli_cmd:
                for _ in range(3):
                    t0 = time.monotonic()
                    pu.run(c.cli_cmd, capture_output=True, timeout=30, cwd=REPO)
                    self.add(c, "cli_s", time.monotonic() - t0)
            self.contestants.append(c)
            state = f"version {c.version}" if c.available else f"n/a ({c.reason})"
            log(f"  {c.name:12s} {state}   [setup+smoke {time.monotonic() - t:.1f} s]")

    def run(self):
        cfg = self.cfg
        reps = cfg["reps"]
        kills = [cfg["kills"] // reps + (1 if r < cfg["kills"] % reps else 0) for r in range(reps)]
        active = [c for c in self.contestants if c.available]
        plan = []
        for r in range(reps):
            for n in cfg["start_ns"]:
                plan.append(("idle", n, r))
            for n in cfg["busy_ns"]:
                plan.append(("busy", n, r))
            if not self.args.no_extra:
                plan.append(("empty", 1, r))
        took = {}  # (kind, n) -> seconds its block took in the first rep
        for kind, n, r in plan:
            est = took.get((kind, n), 0)
            if self.elapsed() + est > cfg["budget_s"]:
                self.warnings.append(f"time budget ({cfg['budget_s']} s): skipped rep {r + 1} "
                                     f"{kind} N={n} (would take ~{est:.0f} s more)")
                log(f"  ! time budget: skipping rep {r + 1} {kind} N={n}")
                continue
            log(f"  rep {r + 1}/{reps} {kind} N={n}  [{self.elapsed():.0f} s]")
            t_block = time.monotonic()
            for c in active:
                if n > PEERS_MAX_N and c.name not in FORKERS:
                    continue
                if kind == "idle":
                    self.run_idle(c, n, kills[r] if n == RES_N else 0)
                elif kind == "busy":
                    self.run_busy(c, n)
                else:
                    self.run_empty(c)
            took.setdefault((kind, n), time.monotonic() - t_block)

    def cleanup_all(self):
        for pool in list(self.live_pools):
            try:
                pool.c.force_cleanup(pool)
                self.finish(pool)
            except Exception as e:  # noqa: BLE001
                self.warnings.append(f"cleanup of {pool.dir} failed: {e}")
        self.reaper.reap()


# ---------------------------------------------------------------- reporting
def med(xs):
    return statistics.median(xs) if xs else None


def fmt_time(s):
    if s is None:
        return None
    if s < 0.01:
        return f"{s * 1e3:.2f} ms"
    if s < 10:
        return f"{s * 1e3:.0f} ms"
    return f"{s:.1f} s"


def build_rows(h):
    cfg = h.cfg
    rows = []  # (label, key, kind) kind: time|ms|pct|mib|int|rate
    for n in cfg["start_ns"]:
        rows.append((f"start N={n}", f"start_{n}", "time"))
    for n in cfg["start_ns"]:
        rows.append((f"stop idle N={n}", f"stop_idle_{n}", "time"))
    for n in cfg["busy_ns"]:
        rows.append((f"stop busy N={n}", f"stop_busy_{n}", "time"))
        rows.append((f"tasks cut, busy N={n} (total)", f"cut_busy_{n}", "sum"))
    rows += [
        ("respawn median", "respawn_ms", "ms"),
        ("respawn max", "respawn_ms:max", "ms"),
        (f"master CPU idle (N={RES_N})", "cpu_pct", "pct"),
        ("control CLI startup (no daemon call)", "cli_s", "time"),
        (f"master RSS (N={RES_N})", "rss_mib", "mib"),
        (f"workers total PSS (N={RES_N})", "pss_mib", "mib"),
        ("zombies max during kills", "zombies_during:max", "int"),
        ("zombies 1 s after kills", "zombies_after:max", "int"),
        ("empty-task loop, 1 worker", "empty_rate", "rate"),
    ]
    for n in cfg["start_ns"]:
        rows.append((f"respawn median N={n}", f"respawn_ms_{n}", "ms"))
    for n in cfg["start_ns"]:
        rows.append((f"workers total PSS N={n}", f"pss_mib_{n}", "mib"))
    for n in cfg["start_ns"]:
        rows.append((f"master RSS N={n}", f"rss_mib_{n}", "mib"))
    return rows


def value(h, cname, key):
    k, _, agg = key.partition(":")
    xs = h.samples.get(cname, {}).get(k, [])
    if not xs:
        return None, 0
    if agg == "max":
        return max(xs), len(xs)
    return med(xs), len(xs)


def fmt(kind, v):
    if v is None:
        return "n/a"
    return {"time": fmt_time, "ms": lambda x: f"{x:.1f} ms", "pct": lambda x: f"{x:.2f} %",
            "mib": lambda x: f"{x:.1f} MiB", "int": lambda x: f"{int(x)}",
            "sum": lambda x: f"{int(x)}", "rate": lambda x: f"{x:,.0f}/s"}[kind](v)


def tables(h):
    cs_ = h.contestants
    rows = build_rows(h)
    names = [c.name for c in cs_]
    out = []
    head = "| metric | " + " | ".join(names) + " |"
    sep = "|---|" + "---:|" * len(names)
    out += ["### Absolute (median of runs unless noted)", "", head, sep]
    for label, key, kind in rows:
        cells = []
        for c in cs_:
            if not c.available:
                cells.append("n/a")
                continue
            if kind == "sum":
                xs = h.samples.get(c.name, {}).get(key, [])
                cells.append(f"{sum(xs)} of {len(xs)} runs" if xs else "n/a")
                continue
            v, cnt = value(h, c.name, key)
            if kind == "pct" and v == 0:
                cells.append(f"0 (< {100 / (pu.CLK_TCK * h.cfg['cpu_s']):.2g} %)")
            elif key == "cli_s" and v is None:
                cells.append({"floor": "- (signal)", "pm2": "n/a (any pm2 call spawns a daemon)"}
                             .get(c.name, "n/a"))
            else:
                cells.append(fmt(kind, v))
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    def ratio_table(title, base_names, subject_names):
        t = [f"### {title}", "", "| metric | " + " | ".join(f"{s} / {b}" for s in subject_names
                                                            for b in base_names if s != b) + " |"]
        ncols = sum(1 for s in subject_names for b in base_names if s != b)
        t.append("|---|" + "---:|" * ncols)
        for label, key, kind in rows:
            if kind in ("sum", "int"):
                continue
            cells = []
            for s in subject_names:
                for b in base_names:
                    if s == b:
                        continue
                    vs, _ = value(h, s, key)
                    vb, _ = value(h, b, key)
                    if vs is None or vb is None:
                        cells.append("n/a")
                    elif vb == 0 or (kind == "pct" and vs == 0):
                        cells.append("- (0 ticks)" if kind == "pct" else "- (base 0)")
                    else:
                        r_ = vs / vb
                        cells.append(f"x{r_:.2f}" if r_ >= 0.1 else f"x{r_:.2g}")
            if any(x.startswith("x") for x in cells):
                t.append(f"| {label} | " + " | ".join(cells) + " |")
        return t + [""]

    avail = [c.name for c in cs_ if c.available]
    out.append("")
    if "floor" in avail and len(avail) > 1:
        out += ratio_table("Ratio to the floor (lower is better, except tasks/s)", ["floor"],
                           [n for n in avail if n != "floor"])
    peers = [n for n in ("supervisord", "circus", "pm2") if n in avail]
    if "tprocess" in avail and peers:
        out += ratio_table("tprocess / each peer (lower is better, except tasks/s)", peers,
                           ["tprocess"])
    return out


def machine_info():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        mem = f"{int(open('/proc/meminfo').readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem": mem, "kernel": platform.release(),
            "python": sys.version.split()[0], "node": shutil.which("node") and pu.run(
                ["node", "--version"], capture_output=True, text=True).stdout.strip()}


def write_report(h, args, total_s, plot_path):
    mi = machine_info()
    cmd = "python bench/run.py" + (" --quick" if args.quick else "") + \
        (f" --ns {args.ns}" if args.ns else "") + (f" --reps {args.reps}" if args.reps else "") + \
        (" --no-extra" if args.no_extra else "") + \
        (f" --out {args.out}" if args.out != DEFAULT_OUT else "") + \
        (f" --only {args.only}" if args.only else "")
    lines = [
        "# tprocess benchmarks", "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {mi['nproc']} cores ({mi['cpu']}), {mi['mem']}, Linux {mi['kernel']}, "
        f"Python {mi['python']}, node {mi['node']}",
        f"- command: `{cmd}` (from the repo root, with `.venv/bin/python`); "
        f"mode {h.mode}, {h.cfg['reps']} runs per cell, run interleaved; took {total_s:.0f} s",
        "", "| contestant | version | how it is run |", "|---|---|---|",
    ]
    for c in h.contestants:
        v = c.version if c.available else f"n/a ({c.reason})"
        lines.append(f"| {c.name} | {v} | {c.how} |")
    lines += ["", f"Peers get a {cs.GRACE_S} s graceful-stop timeout before SIGKILL "
              "(supervisord stopwaitsecs, circus graceful_timeout, PM2 kill_timeout; PM2 stop "
              "signal SIGTERM via PM2_KILL_SIGNAL). Their workers are `python bench/workload.py` "
              "with the project's Python; floor and tprocess fork theirs.", ""]
    lines += tables(h)
    if plot_path:
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.out)))
        lines += [f"![start and stop time against N]({rel})", ""]
    if h.errors or h.warnings:
        lines += ["### Failures and warnings", ""]
        for name, errs in h.errors.items():
            for e in errs:
                lines.append(f"- {name}: {e}")
        for w in h.warnings:
            lines.append(f"- {w}")
        lines.append("")
    lines += [
        "### What is measured", "",
        "- **start**: from launching the start command until N distinct worker pids have "
        "written the start record of their first task (task records carry "
        "`time.monotonic_ns()`, compared with the harness's own clock).",
        "- **stop idle**: workers loop on a 0.5 s interruptible sleep; from issuing the stop "
        "(command or, for the floor, SIGTERM) until the master and every worker are gone from "
        "/proc (zombies count as gone).",
        "- **stop busy**: workers run 2 s tasks that must not be cut (uninterruptible sleep); "
        "the stop is issued 1 s after the last worker began its first task. Tasks cut = start "
        "records without an end record among the pool's pids.",
        f"- **respawn**: SIGKILL a worker (a child of the master that has run a task), time until a new pid "
        f"writes a start record; {h.cfg['kills']} kills at random 0.1-0.4 s gaps, split across "
        f"the N={RES_N} runs.",
        f"- **master CPU**: utime+stime of the master over {h.cfg['cpu_s']:.0f} s of idle pool, "
        "as % of one core. RSS: master VmRSS. PSS: sum of smaps_rollup Pss of the master's "
        "children (its workers; for tprocess also its output process, `NAME-output`).",
        "- **zombies**: state Z children of the master, sampled every 20 ms during the kills "
        "(max) and 1 s after the last respawn.",
        "- **empty-task loop**: one worker runs a task that only counts calls; after 1000 "
        "warm-up calls it times 5 windows of >= 0.2 s (reading the clock only at doubling call "
        "counts) and reports the fastest. For the exec'd peers this is the script's own "
        "`while not stopping: task(ctx)` loop (the floor's loop is the same), so the three peer "
        "figures measure one loop and differ only by noise.",
        "- Times are medians over runs; master CPU resolution is one clock tick "
        f"({1000 // pu.CLK_TCK} ms) over the window. Other work on the machine adds noise.",
        "",
    ]
    raw = ["<details><summary>raw samples</summary>", "", "```"]
    for name, ms in h.samples.items():
        for k, xs in sorted(ms.items()):
            raw.append(f"{name:12s} {k:22s} " + " ".join(f"{x:.4g}" for x in xs))
    raw += ["```", "", "</details>", ""]
    lines += raw
    kept = _later_sections(args.out)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + ("\n\n" + kept if kept else ""))
    return lines


def _later_sections(path):
    """What follows this report in the file: from its first `## ` heading on (the hand-written
    targets and causes, and the sections other tools append). This report's own headings are
    `#` and `###`, so a run rewrites the report and keeps the rest."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    at = text.find("\n## ")
    return text[at + 1:] if at >= 0 else ""


DEFAULT_OUT = os.path.join("bench", "results.md")


def make_plot(h, json_path, png_path):
    py = os.path.join(se.VBIN, "python")
    if not os.path.exists(py):
        h.warnings.append("no plot: bench venv missing")
        return None
    p = pu.run([py, os.path.join(BENCH, "plot.py"), json_path, png_path],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        h.warnings.append(f"plot failed: {p.stderr.strip()[-200:]}")
        return None
    return png_path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer N values, shorter windows")
    ap.add_argument("--out", default=DEFAULT_OUT, help="markdown results file")
    ap.add_argument("--only", default="", help="comma-separated contestant names (debugging)")
    ap.add_argument("--ns", default="", help="comma-separated N for start/stop (default: the mode's)")
    ap.add_argument("--reps", type=int, default=0, help="runs per cell (default: the mode's)")
    ap.add_argument("--no-extra", action="store_true", help="start/stop/respawn/memory only: no busy "
                    "stops, no empty-task loop")
    args = ap.parse_args()
    os.chdir(REPO)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    h = Harness(args)
    log(f"tprocess bench ({h.mode}); subreaper={'on' if h.reaper.enabled else 'OFF'}; "
        f"python {sys.version.split()[0]} at {sys.executable}")
    interrupted = False
    try:
        log("setup (install + smoke test):")
        h.setup()
        h.run()
    except KeyboardInterrupt:
        interrupted = True
        h.warnings.append("interrupted")
        log("interrupted, cleaning up")
    finally:
        h.cleanup_all()
    total = h.elapsed()
    json_path = os.path.join(BENCH, "results.json")
    with open(json_path, "w") as f:
        json.dump({"mode": h.mode, "cfg": h.cfg, "samples": h.samples, "errors": h.errors,
                   "warnings": h.warnings, "total_s": total,
                   "versions": {c.name: (c.version if c.available else f"n/a ({c.reason})")
                                for c in h.contestants}}, f, indent=1)
    png = make_plot(h, json_path, os.path.join(BENCH, "plot.png"))
    lines = write_report(h, args, total, png)
    log("")
    start = lines.index("### Absolute (median of runs unless noted)")
    end = next((i for i, ln in enumerate(lines) if ln.startswith("### What is measured")), len(lines))
    log("\n".join(ln for ln in lines[start:end] if not ln.startswith("![")))
    log("versions: " + "; ".join(f"{c.name} {c.version if c.available else 'n/a'}"
                                  for c in h.contestants))
    log(f"wrote {args.out}, {json_path}" + (f", {png}" if png else "") + f"; total {total:.0f} s")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
