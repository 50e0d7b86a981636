"""Work-queue benchmark of issue 7: tprocess vs Celery, RQ, dramatiq, huey, arq and a floor.

    .venv/bin/python bench/queues/run.py                       # full run, report to bench/queues/results.md
    .venv/bin/python bench/queues/run.py --append BENCHMARKS.md
    .venv/bin/python bench/queues/run.py --quick --only floor,tprocess   # debugging

Installs the peers into bench/.work/venv (setup.py), then runs itself again with that venv's Python.
Starts its own redis-server on a free 127.0.0.1 port with a scratch folder (each contestant gets a
database of its own) and stops it by pid. Every worker process tree it starts is stopped by pid
(SIGTERM, then SIGKILL of whatever is left, checked by start time) on every path, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [HERE, BENCH]

import install  # noqa: E402
import procutil as pu  # noqa: E402

WORKLOADS = ("throughput", "latency", "async", "kill")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Processes:
    """The process trees the harness started: stopped by pid, leftovers SIGKILLed by pid."""

    def __init__(self) -> None:
        self.tops: list[subprocess.Popen] = []
        self.known: dict[int, int] = {}  # pid -> start time, of every descendant seen
        self.spare: set[int] = set()  # the harness's own helpers (redis-server): never stopped here

    def start(self, argv: list[str], env: dict[str, str], logfile: str) -> subprocess.Popen:
        with open(logfile, "ab") as out:
            proc = pu.REAPER.popen(
                argv,
                env=env,
                cwd=HERE,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.tops.append(proc)
        self.note()
        return proc

    def note(self) -> None:
        """Remember every process below the harness now (orphans come back to it: it is a subreaper)."""
        procs = pu.all_procs()
        for pid in pu.descendants(os.getpid(), procs):
            stat = pu.read_stat(pid)
            if stat is not None and pid not in self.known and pid not in self.spare:
                self.known[pid] = stat[3]

    def pids_alive(self) -> list[int]:
        return [
            pid
            for pid, start in self.known.items()
            if (st := pu.read_stat(pid)) is not None and st[3] == start and st[0] not in "ZX"
        ]

    def stop(self, grace: float = 10.0) -> None:
        self.note()
        for proc in self.tops:
            if proc.poll() is None:
                pu.kill_verified(proc.pid, self.known.get(proc.pid, -1), signal.SIGTERM)
        pu.wait_until(lambda: not self.pids_alive(), grace, 0.02)
        self.note()
        for pid in self.pids_alive():
            pu.kill_verified(pid, self.known[pid])
        if not pu.wait_until(lambda: not self.pids_alive(), 10, 0.02):
            log(f"warning: still alive after SIGKILL: {self.pids_alive()}")
        for proc in self.tops:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.tops, self.known = [], {}


class Redis:
    def __init__(self, folder: str) -> None:
        import redis

        os.makedirs(folder, exist_ok=True)
        self.port = _free_port()
        self.proc = pu.REAPER.popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                folder,
                "--databases",
                "32",
            ],
            stdout=open(os.path.join(folder, "redis.log"), "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.start_time = None
        client = redis.Redis(port=self.port)
        pu.wait_until(lambda: self.proc.poll() is not None or _pings(client), 20, 0.02)
        if not _pings(client):
            raise RuntimeError(f"redis-server did not answer on port {self.port}")
        self.start_time = pu.read_stat(self.proc.pid)[3]
        self.version = client.info()["redis_version"]
        client.close()

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def flush(self, db: int) -> None:
        import redis

        client = redis.Redis(port=self.port, db=db)
        client.flushdb()
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None and self.start_time is not None:
            pu.kill_verified(self.proc.pid, self.start_time, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pu.kill_verified(self.proc.pid, self.start_time or -1)
            self.proc.wait(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        from peers import contestants

        self.args = args
        self.folder = os.path.join(BENCH, ".work", "qruns", time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(self.folder)
        self.contestants = [
            c
            for c in contestants()
            if not args.only or any(word in c.name.lower() for word in args.only.lower().split(","))
        ]
        self.db = {c.name: n + 1 for n, c in enumerate(contestants())}
        self.procs = Processes()
        self.redis = Redis(os.path.join(self.folder, "redis"))
        self.procs.spare.add(self.redis.proc.pid)
        self.samples: dict[str, dict[str, list]] = {w: {} for w in (*WORKLOADS, "put_many")}
        self.notes: list[str] = []
        self.runs = 0

    def env(self, contestant, url: str, records: str, workload: str) -> dict[str, str]:
        env = dict(os.environ, QB_REDIS=url, QB_RECORDS=records, PYTHONPATH=HERE)
        env.update(contestant.env)  # may set PYTHONPATH (an older tprocess first)
        if workload == "async":
            env["QB_CONCURRENCY"] = "100"
        return env

    def scratch(self, contestant, workload: str) -> tuple[str, str, str]:
        """A fresh folder, the contestant's broker URL (emptied), the records file."""
        self.runs += 1
        slug = "".join(ch for ch in contestant.name.lower() if ch.isalnum())
        folder = os.path.join(self.folder, f"{self.runs:03d}-{workload}-{slug}")
        os.makedirs(folder)
        db = self.db[contestant.name]
        self.redis.flush(db)
        url = self.redis.url(db)
        if hasattr(contestant, "url"):
            url = contestant.url(url, folder)
        contestant.prepare(url)
        return folder, url, os.path.join(folder, "records")

    def produce(self, contestant, url: str, env: dict[str, str], *args: str, timeout: float = 300) -> dict:
        argv = [sys.executable, os.path.join(HERE, "producer.py"), contestant.package, url, *args]
        out = pu.run(argv, env=env, cwd=HERE, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"producer failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start(self, contestant, url: str, workload: str, folder: str, env: dict[str, str]) -> None:
        for argv in contestant.commands(url, workload, folder):
            self.procs.start(argv, env, os.path.join(folder, "workers.log"))

    # --- workloads --------------------------------------------------------------------------

    def run_batch(self, contestant, workload: str, kind: str, jobs: int) -> None:
        """Throughput / async: put `jobs` jobs, start the workers, time until every job ended."""
        folder, url, records = self.scratch(contestant, workload)
        env = self.env(contestant, url, records, workload)
        put = self.produce(contestant, url, env, "bulk", kind, str(jobs))
        if workload == "throughput":
            self._add("put_many", contestant, jobs / put["seconds"])
        started = time.monotonic()
        try:
            self.start(contestant, url, workload, folder, env)
            cap = self.args.cap
            pu.wait_until(lambda: _size(records) >= jobs or time.monotonic() - started > cap, cap + 1, 0.002)
            took = time.monotonic() - started
        finally:
            self.procs.stop()
        done = _size(records)
        if done < jobs:
            self.notes.append(
                f"{contestant.name}, {workload}: {done:,} of {jobs:,} jobs in the {cap:.0f} s cap"
            )
            self._add(workload, contestant, {"seconds": None, "rate": done / took, "capped": True})
        else:
            self._add(workload, contestant, {"seconds": took, "rate": jobs / took, "capped": False})
        log(f"  {workload:10} {contestant.name:20} {done / took:>9,.0f} jobs/s  {took:6.2f} s")

    def run_latency(self, contestant) -> None:
        folder, url, records = self.scratch(contestant, "latency")
        env = self.env(contestant, url, records, "latency")
        try:
            self.start(contestant, url, "latency", folder, env)
            got = self.produce(
                contestant,
                url,
                env,
                "probe",
                str(self.args.probes),
                records,
                str(self.args.probe_budget),
                timeout=300,
            )
        finally:
            self.procs.stop()
        lat = sorted(got["latencies_ns"])
        if not lat:
            raise RuntimeError(got.get("error", "no latency record"))
        p50, p99 = _pct(lat, 50) / 1e6, _pct(lat, 99) / 1e6
        self._add("latency", contestant, {"p50": p50, "p99": p99, "n": len(lat)})
        log(f"  latency    {contestant.name:20} p50 {p50:7.2f} ms  p99 {p99:8.2f} ms  ({len(lat)} probes)")

    def run_kills(self, contestants) -> None:
        """Every contestant at once: one 8 s job, its process SIGKILLed once it started; ran again in 60 s?"""
        runs = []
        for c in contestants:
            folder, url, records = self.scratch(c, "kill")
            env = self.env(c, url, records, "kill")
            self.start(c, url, "kill", folder, env)
            argvs = c.commands(url, "kill", folder)
            runs.append(
                {
                    "c": c,
                    "url": url,
                    "records": records,
                    "env": env,
                    "folder": folder,
                    "argvs": argvs,
                    "killed": None,
                    "again": None,
                }
            )
        try:
            for run in runs:  # put after every system is starting: they all start in parallel
                self.produce(run["c"], run["url"], run["env"], "bulk", "s", "1")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and any(r["again"] is None for r in runs):
                for run in runs:
                    self._kill_step(run)
                if all(
                    r["killed"] and time.monotonic() - r["killed"][1] > 60 for r in runs if r["again"] is None
                ):
                    break
                time.sleep(0.05)
        finally:
            self.procs.stop()
        for run in runs:
            again = run["again"]
            verdict = (
                "no (never started)"
                if not run["killed"]
                else f"yes, after {again:.1f} s"
                if again is not None
                else "no (not within 60 s)"
            )
            self.samples["kill"][run["c"].name] = [verdict]
            log(f"  kill       {run['c'].name:20} {verdict}")

    def _kill_step(self, run: dict) -> None:
        starts = [ln.split() for ln in _text(run["records"]).splitlines() if ln.startswith("S ")]
        if run["killed"] is None and starts:
            pid = int(starts[0][1])
            self.procs.note()
            if pid in self.procs.known:
                pu.kill_verified(pid, self.procs.known[pid])
                run["killed"] = (pid, time.monotonic())
                if any(p.pid == pid for p in self.procs.tops):  # no supervisor of its own: restart it,
                    self._restart(run, pid)  # as systemd would
        elif run["killed"] and run["again"] is None and len(starts) > 1:
            run["again"] = time.monotonic() - run["killed"][1]

    def _restart(self, run: dict, pid: int) -> None:
        for proc in self.procs.tops:
            if proc.pid == pid:
                proc.wait(timeout=10)
                self.procs.start(proc.args, run["env"], os.path.join(run["folder"], "workers.log"))
                return

    def _add(self, workload: str, contestant, sample) -> None:
        self.samples[workload].setdefault(contestant.name, []).append(sample)

    # --- driver -----------------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        plan = [
            ("throughput", lambda c: self.run_batch(c, "throughput", "e", a.jobs)),
            ("latency", self.run_latency),
            ("async", lambda c: self.run_batch(c, "async", "a", a.async_jobs)),
        ]
        for workload, step in plan:
            if workload not in a.workloads:
                continue
            entrants = [c for c in self.contestants if workload in c.workloads]
            for rnd in range(a.rounds):
                log(f"{workload}, round {rnd + 1}/{a.rounds}")
                shift = rnd % len(entrants)  # interleaved, each round in another order
                for c in entrants[shift:] + entrants[:shift]:
                    try:
                        step(c)
                    except Exception as exc:  # noqa: BLE001 - one failure does not end the run
                        self.notes.append(f"{c.name}, {workload}, round {rnd + 1}: {exc}")
                        log(f"  {workload:10} {c.name:20} FAILED: {exc}")
        if "kill" in a.workloads:
            log("kill: every system at once")
            self.run_kills([c for c in self.contestants if "kill" in c.workloads])

    def close(self) -> None:
        try:
            self.procs.stop(grace=3)
        finally:
            self.redis.stop()


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _pct(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, min(len(values), round(pct / 100 * len(values) + 0.4999)))
    return values[rank - 1]


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20_000, help="empty jobs per throughput run")
    parser.add_argument("--async-jobs", type=int, default=4_000)
    parser.add_argument("--probes", type=int, default=500)
    parser.add_argument("--probe-budget", type=float, default=15.0, help="seconds of probes per latency run")
    parser.add_argument("--cap", type=float, default=30.0, help="seconds a throughput/async run may take")
    parser.add_argument("--only", default="", help="comma-separated name fragments")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="1 round, 4,000 jobs, 100 probes")
    parser.add_argument("--append", metavar="FILE", help="append the report to FILE (BENCHMARKS.md)")
    parser.add_argument("--out", default=os.path.join(HERE, "results.md"))
    args = parser.parse_args()
    args.workloads = args.workloads.split(",")
    if args.quick:
        args.rounds, args.jobs, args.async_jobs, args.probes = 1, 4_000, 2_000, 100
    install.reexec_in_venv(log)  # returns only in the bench venv
    import report

    pu.REAPER = pu.Reaper()
    began = time.monotonic()
    harness = None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        harness = Harness(args)
        harness.run()
    except KeyboardInterrupt:
        log("interrupted: stopping what was started")
    finally:
        if harness is not None:
            harness.close()
    if harness is None:
        return
    text = report.render(harness, args, time.monotonic() - began)
    with open(os.path.join(harness.folder, "samples.json"), "w") as f:
        json.dump(harness.samples, f, indent=1)
    with open(args.out, "w") as f:
        f.write(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
