"""Operating a live pool (issue 6): what the guards, metrics and control commands cost.

    .venv/bin/python bench/ops.py [--quick] [--out FILE] [--append BENCHMARKS.md]

Run from the repo root with the project's venv. Starts its own instances (unique
names, a scratch dir under bench/.work/ops/) with `tprocess start -d` and prints a
markdown section with a table per measure:

1. loop: the empty-task rate of one worker with every feature off, then with
   task_timeout, max_tasks, max_memory, each alone and all three, and with metrics on
   (the duration histogram); interleaved rounds, medians.
2. commands: `status`, `stop`, `scale`, `reload` (of an instance that is not running:
   the command's own cost) and `status` of a live instance, against `python -c pass`,
   interleaved (bench/cli_startup.py's measure).
3. status of 500 workers: `tprocess status --json` and the bare control round trip.
4. reload of 100 workers, reload_batch = 10: the process table and `status` sampled
   throughout the roll.
5. idle master with 100 idle workers: wake-ups (voluntary context switches) and CPU
   over a window, with no feature, with task_timeout, with max_memory.

Process hygiene: the script makes itself a child subreaper, so a master it started and
everything that master leaves behind stay its children; on every path (errors, Ctrl-C,
SIGTERM) it stops each instance with `tprocess stop`, then SIGKILLs by pid (checked by
start time) whatever of it is left, and reaps.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cli_startup import measure as measure_command
from procutil import cpu_ticks, kill_verified, read_stat

from tprocess import control

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, ".work", "ops")
TPROCESS = os.path.join(os.path.dirname(sys.executable), "tprocess")
TASKS = os.path.join(BENCH, "ops_tasks.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
HEADING = "## Operating a live pool (issue 6)"

# targets of issue 6
LOOP_TARGET_NS = 2000  # per empty task, everything on: at least 500,000 tasks/s
COMMAND_TARGET_MS = 25.0  # a command's own cost over `python -c pass`
STATUS_TARGET_MS = 100.0  # `status --json` with 500 workers


class BenchError(Exception):
    pass


# --- instances ------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One tprocess instance this script started: its name, folder and every pid it saw."""

    name: str
    folder: str
    env: dict[str, str]
    master: int = 0
    master_start: int = 0
    known: dict[int, int] = field(default_factory=dict)  # pid -> start time, for cleanup by pid

    @property
    def log(self) -> str:
        return os.path.join(self.folder, "tprocess.log")

    def write_config(self, text: str) -> str:
        path = os.path.join(self.folder, "tprocess.toml")
        with open(path, "w") as fh:
            fh.write(f'name = "{self.name}"\n' + text)
        return path

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TPROCESS, *args], cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, config: str, *extra: str) -> None:
        result = self.run("start", "-c", config, "-d", "--log-file", self.log, *extra)
        found = re.search(r"master pid (\d+)", result.stdout)
        if result.returncode != 0 or not found:
            raise BenchError(f"start of {self.name} failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()[-300:]}")
        self.master = int(found.group(1))
        stat = read_stat(self.master)
        if stat is None:
            raise BenchError(f"master {self.master} of {self.name} is gone right after start")
        self.master_start = stat[3]
        self.known[self.master] = self.master_start
        self.remember_children()

    def status(self) -> dict[str, Any]:
        """The master's status reply, over the control socket (no CLI start-up)."""
        return control.request(self.name, {"cmd": "status"}, timeout=10)[1]

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.master}/task/{self.master}/children") as fh:
                return [int(p) for p in fh.read().split()]
        except OSError:
            return []

    def workers(self) -> list[int]:
        """The master's children less its output process (`NAME-output`, a child too)."""
        return [pid for pid in self.children() if title_of(pid) != f"{self.name}-output"]

    def remember_children(self) -> None:
        for pid in self.children():
            stat = read_stat(pid)
            if stat is not None:
                self.known.setdefault(pid, stat[3])

    def stop(self) -> None:
        """Stop gracefully; then SIGKILL by pid what is left of the instance."""
        if self.master and master_alive(self):
            self.remember_children()
            try:
                self.run("stop", "--name", self.name, "--timeout", "10", timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid, started in self.known.items():
            kill_verified(pid, started)
        kill_orphans(self.name)
        reap_children()
        self.master = 0


def master_alive(inst: Instance) -> bool:
    stat = read_stat(inst.master)
    return stat is not None and stat[3] == inst.master_start and stat[0] not in "ZX"


def title_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def kill_orphans(name: str) -> None:
    """Our own children titled as the instance: orphans of its master, reparented to us
    (we are a subreaper). Only pids whose parent is this process are touched."""
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as fh:
        pids = [int(p) for p in fh.read().split()]
    for pid in pids:
        stat = read_stat(pid)
        if stat is not None and stat[0] != "Z" and title_of(pid).startswith(f"{name}-"):
            kill_verified(pid, stat[3])


def reap_children() -> None:
    """Reap our exited children (the masters, once stopped, and any orphans they left)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline or not any_dying_child():
                return
            time.sleep(0.01)


def any_dying_child() -> bool:
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as fh:
        return any(read_stat(int(p)) and read_stat(int(p))[0] == "Z" for p in fh.read().split())


class Lab:
    """Makes instances and stops every one of them on the way out."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.root = os.path.join(WORK, self.tag)
        os.makedirs(self.root)
        self.count = 0
        self.open: list[Instance] = []

    @contextmanager
    def instance(self, **env: str) -> Iterator[Instance]:
        self.count += 1
        name = f"ops-{self.tag}-{self.count}"
        folder = os.path.join(self.root, name)
        os.makedirs(folder)
        inst = Instance(name, folder, dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **env))
        self.open.append(inst)
        try:
            yield inst
        finally:
            inst.stop()
            self.open.remove(inst)

    def close(self) -> None:
        for inst in list(self.open):
            inst.stop()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def group_toml(name: str, task: str, workers: int, **keys: Any) -> str:
    lines = [f"[groups.{name}]", f'task = "{TASKS}:{task}"', f"workers = {workers}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def med(values: list[float]) -> float:
    return statistics.median(values)


# --- 1. the worker loop ---------------------------------------------------------------------------

LOOP_CASES: dict[str, dict[str, Any]] = {
    "every feature off": {},
    "task_timeout = 3600": {"task_timeout": 3600},
    "max_tasks = 1000000": {"max_tasks": 1_000_000},
    'max_memory = "4GiB"': {"max_memory": "4GiB"},
    "all three": {"task_timeout": 3600, "max_tasks": 1_000_000, "max_memory": "4GiB"},
    "metrics on": {"metrics": True},
    "all three + metrics": {"task_timeout": 3600, "max_tasks": 1_000_000, "max_memory": "4GiB",
                            "metrics": True},
}
LOOP_WINDOWS = 8  # timed windows of >= 0.1 s per run; the fastest is the run's figure


def loop_rate(lab: Lab, keys: dict[str, Any]) -> float:
    """Empty tasks per second in one worker: the fastest of LOOP_WINDOWS windows."""
    keys = dict(keys)
    metrics = keys.pop("metrics", False)
    with lab.instance() as inst:
        records = os.path.join(inst.folder, "records")
        inst.env["OPS_RECORDS"] = records
        top = f'metrics = "127.0.0.1:{free_port()}"\n' if metrics else ""
        config = inst.write_config(top + group_toml("loop", "empty", 1, **keys))
        inst.start(config)
        windows = wait_until(lambda: len(w := read_windows(records)) >= LOOP_WINDOWS and w, 60,
                             "the empty-task windows")
        inst.remember_children()
    return max(calls / ns * 1e9 for calls, ns in windows)


def read_windows(path: str) -> list[tuple[int, int]]:
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return []
    return [(int(p[2]), int(p[3])) for p in (line.split() for line in lines) if len(p) == 4 and p[0] == "W"]


def bench_loop(lab: Lab, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {case: [] for case in LOOP_CASES}
    for r in range(rounds):
        order = list(LOOP_CASES)
        random.shuffle(order)  # no case always runs first (or right after a heavy one)
        for case in order:
            rates[case].append(loop_rate(lab, LOOP_CASES[case]))
        log(f"loop round {r + 1}/{rounds}: " + ", ".join(f"{c} {rates[c][-1]:,.0f}/s" for c in LOOP_CASES))
    return rates


def loop_table(rates: dict[str, list[float]]) -> list[str]:
    base_ns = 1e9 / med(rates["every feature off"])
    out = ["| worker loop | empty tasks/s (median) | ns per task | over every feature off | runs |",
           "|---|---:|---:|---:|---|"]
    for case, values in rates.items():
        ns = 1e9 / med(values)
        runs = " ".join(f"{v / 1e6:.2f}M" for v in values)
        out.append(f"| {case} | {med(values):,.0f} | {ns:.0f} | {ns - base_ns:+.0f} ns "
                   f"(x{ns / base_ns:.2f}) | {runs} |")
    return out


# --- 2. the commands' own cost --------------------------------------------------------------------


def bench_commands(lab: Lab, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]],
                                                   tuple[float, int]]:
    absent = f"absent-{lab.tag}"
    package = write_bytecode()
    uncached = copy_without_bytecode(package, os.path.join(lab.root, "uncached"))
    with lab.instance() as inst:
        inst.start(inst.write_config(group_toml("w", "idle", 5)))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import argparse'": [sys.executable, "-c", "import argparse"],
            "python -c 'import tprocess.cli'": [sys.executable, "-c", "import tprocess.cli"],
            "tprocess status (not running)": [TPROCESS, "status", "--name", absent],
            "tprocess stop (not running)": [TPROCESS, "stop", "--name", absent],
            "tprocess scale 3 (not running)": [TPROCESS, "scale", "--name", absent, "3"],
            "tprocess reload (not running)": [TPROCESS, "reload", "--name", absent],
            "tprocess status (5 workers)": [TPROCESS, "status", "--name", inst.name],
            "tprocess status --json (5 workers)": [TPROCESS, "status", "--json", "--name", inst.name],
            "tprocess status (not running), no bytecode caches": [
                sys.executable, "-c", f"import sys; sys.path.insert(0, {uncached!r}); "
                f"sys.argv = ['tprocess', 'status', '--name', {absent!r}]; "
                "from tprocess.cli import main; main()"],
        }
        walls: dict[str, list[float]] = {label: [] for label in commands}
        cpus: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(3):  # warm the page cache
            for argv in commands.values():
                measure_command(argv)
        for _ in range(rounds):
            for label, argv in commands.items():
                wall, cpu = measure_command(argv)
                walls[label].append(wall * 1000)
                cpus[label].append(cpu * 1000)
        inst.remember_children()
    return walls, cpus, scan_cost(absent)


def write_bytecode() -> str:
    """tprocess's bytecode caches, as `pip install` writes them; returns the package's folder."""
    import compileall

    import tprocess

    package = os.path.dirname(tprocess.__file__)
    compileall.compile_dir(package, quiet=1)
    return package


def copy_without_bytecode(package: str, folder: str) -> str:
    """A copy of the package's sources alone; run with PYTHONDONTWRITEBYTECODE it stays so."""
    import shutil

    shutil.copytree(package, os.path.join(folder, "tprocess"), ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def scan_cost(name: str) -> tuple[float, int]:
    """(ms, processes): what the /proc scan for an instance's leftovers costs on this machine now."""
    from tprocess import discovery

    times = []
    for _ in range(20):
        began = time.monotonic()
        discovery.find_instance(name)
        times.append((time.monotonic() - began) * 1000)
    return med(times), sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def commands_table(walls: dict[str, list[float]], cpus: dict[str, list[float]]) -> list[str]:
    base, base_cpu = med(walls["python -c pass"]), med(cpus["python -c pass"])
    out = ["| command | wall ms (median) | over python -c pass | ratio | CPU ms | CPU over |",
           "|---|---:|---:|---:|---:|---:|"]
    for label in walls:
        wall, cpu = med(walls[label]), med(cpus[label])
        out.append(f"| `{label}` | {wall:.1f} | {wall - base:+.1f} ms | x{wall / base:.2f} | "
                   f"{cpu:.1f} | {cpu - base_cpu:+.1f} ms |")
    return out


# --- 3. status of 500 workers ---------------------------------------------------------------------


def bench_status_500(lab: Lab, rounds: int, workers: int) -> dict[str, list[float]]:
    with lab.instance() as inst:
        inst.start(inst.write_config(group_toml("w", "idle", workers)), "--graceful-timeout", "10")
        inst.remember_children()
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            f"tprocess status --json ({workers} workers)":
                [TPROCESS, "status", "--json", "--name", inst.name],
            f"tprocess status ({workers} workers)": [TPROCESS, "status", "--name", inst.name],
        }
        times: dict[str, list[float]] = {label: [] for label in commands}
        times["control round trip (in process)"] = []
        cpus: dict[str, list[float]] = {label: [] for label in commands}
        for argv in commands.values():
            measure_command(argv)
        for _ in range(rounds):
            for label, argv in commands.items():
                wall, cpu = measure_command(argv)
                times[label].append(wall * 1000)
                cpus[label].append(cpu * 1000)
            began = time.monotonic()
            reply = inst.status()
            times["control round trip (in process)"].append((time.monotonic() - began) * 1000)
            if len(reply["workers"]) != workers:
                raise BenchError(f"status listed {len(reply['workers'])} workers, not {workers}")
    return times, cpus


def status_table(times: dict[str, list[float]], cpus: dict[str, list[float]]) -> list[str]:
    base, base_cpu = med(times["python -c pass"]), med(cpus["python -c pass"])
    out = ["| what | wall ms (median) | min | max | over python -c pass | CPU ms | CPU over |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for label, values in times.items():
        over = f"{med(values) - base:+.1f} ms" if label.startswith("tprocess") else ""
        cpu = f"{med(cpus[label]):.1f}" if label in cpus else ""
        cpu_over = f"{med(cpus[label]) - base_cpu:+.1f} ms" if label.startswith("tprocess") else ""
        out.append(f"| `{label}` | {med(values):.1f} | {min(values):.1f} | {max(values):.1f} | {over} | "
                   f"{cpu} | {cpu_over} |")
    return out


# --- 4. a rolling reload --------------------------------------------------------------------------

GROUP = "w"


@dataclass
class RollSample:
    at: float
    titled: int  # live children titled NAME-w-I
    total: int  # every live child but the metrics and output processes (a fresh fork: titled as the master)
    ready: int | None = None  # workers of the group past setup (idle or busy) in `status`


def sample_children(inst: Instance) -> RollSample:
    titled = total = 0
    prefix = f"{inst.name}-{GROUP}-"
    for pid in inst.children():
        stat = read_stat(pid)
        if stat is None or stat[0] in "ZX":
            continue
        title = title_of(pid)
        if title in (f"{inst.name}-metrics", f"{inst.name}-output"):  # not workers
            continue
        total += 1
        titled += title.startswith(prefix)
        inst.known.setdefault(pid, stat[3])
    return RollSample(time.monotonic(), titled, total)


def ready_workers(inst: Instance) -> int:
    reply = inst.status()
    return sum(1 for w in reply["workers"] if w["group"] == GROUP and w["state"] in ("idle", "busy"))


@dataclass
class RollResult:
    setup: str
    took: float  # `tprocess reload` wall time
    master_took: float | None  # "reload done in X s" in the master's log
    samples: list[RollSample]
    replaced: int


def one_roll(lab: Lab, workers: int, batch: int, setup: str | None) -> RollResult:
    with lab.instance() as inst:
        keys = {"setup": f"{TASKS}:{setup}"} if setup else {}
        config = inst.write_config(f"reload_batch = {batch}\n" + group_toml(GROUP, "idle", workers, **keys))
        inst.start(config)
        wait_until(lambda: ready_workers(inst) == workers, 30, f"{workers} workers past setup")
        samples = [sample_children(inst)]
        began = time.monotonic()
        proc = subprocess.Popen([TPROCESS, "reload", "--name", inst.name], cwd=inst.folder, env=inst.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while proc.poll() is None:  # alternately: the process table, then the master's status
                samples.append(sample_children(inst))
                sample = sample_children(inst)
                sample.ready = ready_workers(inst)
                samples.append(sample)
            took = time.monotonic() - began
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise BenchError(f"reload failed ({proc.returncode}): {err.strip()[-300:]}")
        after = sample_children(inst)
        after.ready = ready_workers(inst)
        samples.append(after)
    return RollResult(setup or "none", took, master_roll_time(inst.log), samples, out.count(" -> "))


def master_roll_time(path: str) -> float | None:
    with open(path, errors="replace") as fh:
        found = re.findall(r"reload done in ([\d.]+)s", fh.read())
    return float(found[-1]) if found else None


def bench_reload(lab: Lab, rounds: int, workers: int, batch: int) -> list[RollResult]:
    results = []
    for r in range(rounds):
        for setup in (None, "slow_setup"):
            result = one_roll(lab, workers, batch, setup)
            results.append(result)
            titled = [s.titled for s in result.samples]
            log(f"reload round {r + 1}/{rounds}, setup {result.setup}: {result.took:.2f} s, "
                f"titled children {min(titled)}-{max(titled)}, {len(result.samples)} samples")
    return results


def reload_table(results: list[RollResult], workers: int, batch: int) -> list[str]:
    out = ["| setup | roll took (reload command) | master's log | replaced | samples | "
           "live workers (process table) min-max | all children min-max | past setup (status) min-max |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        titled = [s.titled for s in r.samples]
        total = [s.total for s in r.samples]
        ready = [s.ready for s in r.samples if s.ready is not None]
        master = f"{r.master_took:.2f} s" if r.master_took is not None else "?"
        setup = "0.1 s" if r.setup == "slow_setup" else "none"
        out.append(f"| {setup} | {r.took:.2f} s | {master} | {r.replaced} | {len(r.samples)} | "
                   f"{min(titled)}-{max(titled)} | {min(total)}-{max(total)} | {min(ready)}-{max(ready)} |")
    out += ["", f"Bounds: at least {workers} and at most {workers + batch} workers at every sample."]
    return out


# --- 5. the idle master ---------------------------------------------------------------------------

IDLE_CASES: dict[str, dict[str, Any]] = {
    "no feature": {},
    "no feature, one `status` at the start of the window": {"_status": True},
    "task_timeout = 10": {"task_timeout": 10},
    "task_timeout = 1": {"task_timeout": 1},
    'max_memory = "512MiB"': {"max_memory": "512MiB"},
    'task_timeout = 10, max_memory = "512MiB", max_tasks = 1000': {
        "task_timeout": 10, "max_memory": "512MiB", "max_tasks": 1000},
}


@dataclass
class IdleResult:
    voluntary: int
    involuntary: int
    cpu_ticks: int
    window: float
    later: int | None = None  # with a status: wake-ups from 1 s after it to the window's end


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of pid so far."""
    counts = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.endswith("ctxt_switches"):
                counts[key] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def idle_master(lab: Lab, keys: dict[str, Any], workers: int, window: float) -> IdleResult:
    keys = dict(keys)
    ask_status = keys.pop("_status", False)
    with lab.instance() as inst:
        inst.start(inst.write_config(group_toml("w", "idle", workers, **keys)), "--graceful-timeout", "10")
        inst.remember_children()
        time.sleep(1.0)  # the pool settles; nothing here talks to the master (a request would wake it)
        v0, n0 = switches(inst.master)
        t0 = cpu_ticks(inst.master)
        began = time.monotonic()
        v_mid = None
        if ask_status:
            inst.status()
            time.sleep(1.0)
            v_mid = switches(inst.master)[0]
        time.sleep(window - (time.monotonic() - began))
        v1, n1 = switches(inst.master)
        t1 = cpu_ticks(inst.master)
        took = time.monotonic() - began
        if len(inst.workers()) != workers:
            raise BenchError(f"{len(inst.workers())} workers after the idle window, not {workers}")
    return IdleResult(v1 - v0, n1 - n0, (t1 or 0) - (t0 or 0), took, None if v_mid is None else v1 - v_mid)


def bench_idle(lab: Lab, workers: int, window: float) -> dict[str, IdleResult]:
    results = {}
    for case, keys in IDLE_CASES.items():
        results[case] = r = idle_master(lab, keys, workers, window)
        log(f"idle master, {case}: {r.voluntary} voluntary + {r.involuntary} involuntary switches, "
            f"{r.cpu_ticks} ticks in {r.window:.1f} s")
    return results


def idle_table(results: dict[str, IdleResult]) -> list[str]:
    out = ["| groups' keys | wake-ups in the window | wake-ups/s | involuntary switches | "
           "master CPU (ticks of 10 ms) | CPU % of a core |", "|---|---:|---:|---:|---:|---:|"]
    tick = 1 / CLK_TCK
    for case, r in results.items():
        cpu = r.cpu_ticks * tick / r.window * 100
        later = f" ({r.later} after its first second)" if r.later is not None else ""
        out.append(f"| {case} | {r.voluntary}{later} | {r.voluntary / r.window:.2f} | {r.involuntary} | "
                   f"{r.cpu_ticks} | {cpu:.2f} % |")
    return out


# --- report ---------------------------------------------------------------------------------------


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    except OSError:
        pass
    with open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) / 2**20
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.1f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def loop_targets(loop: dict[str, list[float]]) -> list[str]:
    all_on, base = med(loop["all three"]), med(loop["every feature off"])
    extra = 1e9 / all_on - 1e9 / base
    return [f"| empty task with task_timeout, max_tasks and max_memory all on: under 2 µs "
            f"(at least 500,000/s) | {all_on:,.0f}/s, {1e9 / all_on:.0f} ns per task "
            f"({extra:+.0f} ns over every feature off) | {yes(1e9 / all_on < LOOP_TARGET_NS)} |"]


def commands_targets(walls: dict[str, list[float]], cpus: dict[str, list[float]]) -> list[str]:
    out = []
    py, py_cpu = med(walls["python -c pass"]), med(cpus["python -c pass"])
    for cmd in ("status", "stop", "scale 3", "reload"):
        label = f"tprocess {cmd} (not running)"
        wall, cpu = med(walls[label]), med(cpus[label])
        met = yes(wall - py <= COMMAND_TARGET_MS)
        out.append(f"| `tprocess {cmd}` within 25 ms of `python -c pass` | {wall:.1f} ms against "
                   f"{py:.1f} ms: {wall - py:+.1f} ms, x{wall / py:.2f} (CPU {cpu - py_cpu:+.1f} ms) "
                   f"| {met} |")
    return out


def status_targets(result: tuple[dict[str, list[float]], dict[str, list[float]]]) -> list[str]:
    times, cpus = result
    label = next(k for k in times if k.startswith("tprocess status --json"))
    js = med(times[label])
    return [f"| `{label}` within 100 ms | {js:.1f} ms (max {max(times[label]):.1f} ms; CPU "
            f"{med(cpus[label]):.1f} ms; `python -c pass` {med(times['python -c pass']):.1f} ms) | "
            f"{yes(js <= STATUS_TARGET_MS)} |"]


def reload_targets(rolls: list[RollResult], n: int, batch: int) -> list[str]:
    low = min(min(s.titled for s in r.samples) for r in rolls)
    high = max(max(s.titled for s in r.samples) for r in rolls)
    ready_low = min(min(s.ready for s in r.samples if s.ready is not None) for r in rolls)
    return [f"| reload of {n} workers, reload_batch = {batch}: never below {n} running | "
            f"live workers {low}-{high} (process table), past setup at least {ready_low} (status), "
            f"over {len(rolls)} rolls | {yes(low >= n and ready_low >= n and high <= n + batch)} |"]


def idle_targets(idle: dict[str, IdleResult], workers: int) -> list[str]:
    quiet = idle["no feature"]
    return [f"| idle master, {workers} idle workers, no feature: 0 wake-ups | "
            f"{quiet.voluntary} in {quiet.window:.1f} s, {quiet.cpu_ticks} CPU ticks | "
            f"{yes(quiet.voluntary == 0)} |"]


def yes(met: bool) -> str:
    return "yes" if met else "**no**"


@dataclass
class Section:
    """One measure: how to run it, its table with a heading and text, its rows of the targets table."""

    run: Callable[[Lab, argparse.Namespace], Any]
    render: Callable[[argparse.Namespace, Any], list[str]]
    targets: Callable[[argparse.Namespace, Any], list[str]]


def render_loop(args: argparse.Namespace, rates: Any) -> list[str]:
    return [
        f"### Worker loop: one worker, an empty task ({args.loop_rounds} runs per case, interleaved)", "",
        "Each run starts an instance of one worker running `bench/ops_tasks.py:empty`; the worker "
        "times windows of at least 0.1 s (the clock read only at doubling call counts) and the run's "
        f"figure is the fastest of its first {LOOP_WINDOWS} windows. With max_tasks = 1000000 the worker "
        "is recycled every million calls (the most max_tasks allows): windows never span a recycle. "
        "task_timeout is the master's (guards.py): the worker runs the plain loop. metrics on makes "
        "the worker count each task's duration in its slot's histogram (worker.py `_guarded_loop`).",
        "", *loop_table(rates)]


def render_commands(args: argparse.Namespace, result: Any) -> list[str]:
    walls, cpus, scan = result
    return [
        f"### Commands' own cost ({args.cli_rounds} runs each, interleaved, medians)", "",
        "`(not running)`: an instance name nobody uses, so the command starts, finds no master and "
        "answers; that is all of its own cost. `(5 workers)`: a live instance of 5 idle workers. "
        "Wall time from fork to exit; CPU is user + system of the command. The `import` rows show "
        "where the time goes. Bytecode caches of tprocess are written first (`compileall`, as "
        "`pip install` does); the last row runs a copy of the package that has none (this machine "
        "sets PYTHONDONTWRITEBYTECODE=1, so an editable install here never gets any).",
        "", *commands_table(walls, cpus), "",
        f"`status` and `stop` of an instance that is not running look for its leftover workers in /proc: "
        f"{scan[0]:.2f} ms for the {scan[1]} processes on the machine during the run "
        f"({scan[0] / scan[1] * 1000:.1f} µs each, median of 20 scans in this process).",
    ]


def render_status(args: argparse.Namespace, result: Any) -> list[str]:
    return [
        f"### `status` with {args.status_workers} workers ({args.status_rounds} runs, interleaved)", "",
        "The CLI commands are timed from fork to exit; the round trip is one status request "
        "over the control socket from this script (connect, send, the master's answer, parse).",
        "", *status_table(*result)]


def render_reload(args: argparse.Namespace, rolls: Any) -> list[str]:
    return [
        f"### Rolling reload of {args.reload_workers} workers, reload_batch = {args.batch}", "",
        "Workers run `ops_tasks.py:idle` (ctx.sleep(0.5) in a loop). During each `tprocess reload` the "
        "script samples, one after the other: the master's children in /proc (live, titled "
        f"`NAME-{GROUP}-I`; \"all children\" also counts one just forked and not yet retitled, "
        "and leaves out the metrics process), then the process table again together with `status` "
        "over the control socket (workers of the group whose state is `idle` or `busy`, i.e. "
        "past setup). The first sample is taken before the reload, the last after it returned. "
        "Setup 0.1 s: each worker's setup sleeps 0.1 s, like opening a connection.",
        "", *reload_table(rolls, args.reload_workers, args.batch)]


def render_idle(args: argparse.Namespace, results: Any) -> list[str]:
    return [
        f"### Idle master with {args.idle_workers} idle workers ({args.window:.0f} s window each)", "",
        "Workers wait in ctx.sleep(0.5) again and again. Wake-ups = the master's voluntary context "
        "switches (/proc/PID/status) over the window, which begins 1 s after `start -d` returned; "
        "nothing talks to the master in the window except in the row that says so. CPU = utime + "
        "stime of the master (resolution one tick, 10 ms).",
        "", *idle_table(results)]


SECTIONS = {
    "loop": Section(lambda lab, a: bench_loop(lab, a.loop_rounds), render_loop,
                    lambda a, r: loop_targets(r)),
    "commands": Section(lambda lab, a: bench_commands(lab, a.cli_rounds), render_commands,
                        lambda a, r: commands_targets(r[0], r[1])),
    "status": Section(lambda lab, a: bench_status_500(lab, a.status_rounds, a.status_workers),
                      render_status, lambda a, r: status_targets(r)),
    "reload": Section(lambda lab, a: bench_reload(lab, a.reload_rounds, a.reload_workers, a.batch),
                      render_reload, lambda a, r: reload_targets(r, a.reload_workers, a.batch)),
    "idle": Section(lambda lab, a: bench_idle(lab, a.idle_workers, a.window), render_idle,
                    lambda a, r: idle_targets(r, a.idle_workers)),
}


def report(args: argparse.Namespace, took: float, results: dict[str, Any]) -> list[str]:
    cmd = "python bench/ops.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "")
    lines = [
        HEADING, "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine()}; load average {args.load_before} at the start, {loadavg()} at the end",
        f"- command: `{cmd}` (from the repo root, with `.venv/bin/python`); took {took:.0f} s",
        "", "### Targets", "", "| target | measured | met? |", "| --- | --- | --- |",
    ]
    for name, result in results.items():
        lines += SECTIONS[name].targets(args, result)
    for name, result in results.items():
        lines += ["", *SECTIONS[name].render(args, result)]
    return lines + [""]


def write_into(path: str, lines: list[str]) -> None:
    """Put the section into path: in place of an earlier one, else at the end."""
    try:
        with open(path) as fh:
            old = fh.read().split("\n")
    except FileNotFoundError:
        old = []
    if HEADING in old:
        start = old.index(HEADING)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        new = old[:start] + lines + old[end:]
    else:
        new = old + ([""] if old and old[-1] else []) + lines
    with open(path, "w") as fh:
        fh.write("\n".join(new).rstrip("\n") + "\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise BenchError("cannot become a child subreaper")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shorter windows (~1 min)")
    ap.add_argument("--out", help="write the markdown section to this file")
    ap.add_argument("--append", metavar="FILE",
                    help=f"put the section into FILE (replacing an earlier '{HEADING}')")
    ap.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    args.sections = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: no section {', '.join(sorted(unknown))}; sections: {', '.join(SECTIONS)}")
    quick = args.quick
    args.loop_rounds = 3 if quick else 5
    args.cli_rounds = 10 if quick else 30
    args.status_rounds = 5 if quick else 15
    args.reload_rounds = 1 if quick else 3
    args.window = 5.0 if quick else 10.0
    args.status_workers, args.reload_workers, args.idle_workers, args.batch = 500, 100, 100, 10
    return args


def main() -> int:
    args = parse_args()
    os.chdir(REPO)
    signal.signal(signal.SIGTERM, interrupt)
    become_subreaper()
    lab = Lab()
    args.load_before = loadavg()
    began = time.monotonic()
    log(f"tprocess ops bench, scratch {lab.root}")
    results: dict[str, Any] = {}
    try:
        for name in args.sections:
            results[name] = SECTIONS[name].run(lab, args)
            log(f"{name}: done")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    except BenchError as exc:
        log(f"ops bench failed: {exc}")
        return 1
    finally:
        lab.close()
        reap_children()
    lines = report(args, time.monotonic() - began, results)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    if args.append:
        write_into(args.append, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
