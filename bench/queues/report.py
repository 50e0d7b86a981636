"""The markdown section "Work queues (issue 7)": absolute figures, ratios, the issue's targets."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any

import install

PEERS = ("Celery acks_late", "Celery default", "RQ", "dramatiq", "huey", "arq")
TP = ("tprocess (Redis)", "tprocess (SQLite)")


def _med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _rate(samples: dict[str, list], name: str) -> float | None:
    return _med([s["rate"] for s in samples.get(name, [])])  # a capped run: the jobs done in the cap


def _secs(samples: dict[str, list], name: str) -> float | None:
    return _med([s["seconds"] for s in samples.get(name, [])])


def _fmt(v: float | None, unit: str = "", digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}{unit}"


def _machine() -> str:
    cpu = "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    python = sys.version.split()[0]
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.1f} GiB, Linux {platform.release()}, Python {python}"


def render(h: Any, args: Any, total_s: float) -> str:
    s = h.samples
    names = [c.name for c in h.contestants]
    v = install.versions()
    out = [
        "## Work queues (issue 7)",
        "",
        f"{time.strftime('%Y-%m-%d')}; {_machine()}; redis-server {h.redis.version} on 127.0.0.1 "
        "(no persistence).",
        f"Command: `make bench-queues` (`python bench/queues/run.py{' --quick' if args.quick else ''}"
        f"{' --only ' + args.only if args.only else ''}`), {total_s / 60:.1f} min; {args.rounds} rounds, "
        "contestants interleaved in a rotating order, medians.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "| contestant | how it runs (4 worker processes each) |",
        "|---|---|",
    ]
    out += [f"| {c.name} | {c.how} |" for c in h.contestants]
    out += [
        "",
        "Every task is bench/queues/work.py: an empty job writes one byte to a records file; the harness "
        "times from the start of the worker command (start-up included) until the file holds one byte "
        "per job. "
        "Jobs are put before the workers start, with each system's bulk API where it has one.",
        "",
    ]
    out += _throughput(s, names, args)
    out += _latency(s, names, args)
    out += _async(s, names, args)
    out += _kill(s, names)
    out += _targets(s)
    if h.notes:
        out += ["", "Notes from the run:", ""] + [f"- {n}" for n in h.notes]
    return "\n".join(out) + "\n"


def _throughput(s: dict, names: list[str], args: Any) -> list[str]:
    if not s["throughput"]:
        return []
    floor = _rate(s["throughput"], "floor")
    out = [
        f"### Throughput: {args.jobs:,} empty jobs, 4 processes",
        "",
        "| contestant | jobs/s (median) | runs (jobs/s; capped: jobs done within the cap / cap) | / floor | "
        "bulk put, jobs/s |",
        "|---|---:|---|---:|---:|",
    ]
    for name in names:
        runs = s["throughput"].get(name, [])
        if not runs:
            continue
        rate = _rate(s["throughput"], name)
        each = ", ".join(_fmt(r["rate"]) + (" (capped)" if r["capped"] else "") for r in runs)
        ratio = f"{rate / floor:.2f}" if rate and floor else "-"
        out.append(
            f"| {name} | {_fmt(rate)} | {each} | {ratio} | {_fmt(_med(s['put_many'].get(name, [])))} |"
        )
    return out + [""]


def _latency(s: dict, names: list[str], args: Any) -> list[str]:
    if not s["latency"]:
        return []
    out = [
        f"### Latency from put to task start, one job at a time ({args.probes} probes per run, 4 processes)",
        "",
        "| contestant | p50 ms | p99 ms | probes per run |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        runs = s["latency"].get(name, [])
        if runs:
            out.append(
                f"| {name} | {_fmt(_med([r['p50'] for r in runs]), digits=2)} | "
                f"{_fmt(_med([r['p99'] for r in runs]), digits=2)} | {', '.join(str(r['n']) for r in runs)} |"
            )
    return out + [
        "",
        "A probe is put once the previous one started (or 20 ms passed), 2 ms apart; a run stops "
        f"after {args.probe_budget:.0f} s of probes, so slow systems have fewer.",
        "",
    ]


def _async(s: dict, names: list[str], args: Any) -> list[str]:
    if not s["async"]:
        return []
    floor = _secs(s["async"], "floor")
    out = [
        f"### Async: {args.async_jobs:,} jobs awaiting 50 ms, 4 processes x concurrency 100",
        "",
        "| contestant | seconds (median) | runs | / floor |",
        "|---|---:|---|---:|",
    ]
    for name in names:
        runs = s["async"].get(name, [])
        if runs:
            secs = _secs(s["async"], name)
            each = ", ".join(_fmt(r["seconds"], digits=2) if r["seconds"] else "capped" for r in runs)
            out.append(
                f"| {name} | {_fmt(secs, digits=2)} | {each} | "
                f"{f'{secs / floor:.2f}' if secs and floor else '-'} |"
            )
    return out + [
        "",
        f"Ideal: {args.async_jobs:,} / 400 x 50 ms = {args.async_jobs / 400 * 0.05:.2f} s. "
        "dramatiq and huey run the job as `time.sleep(0.05)` in 100 threads per process.",
        "",
    ]


def _kill(s: dict, names: list[str]) -> list[str]:
    if not s["kill"]:
        return []
    out = [
        "### A worker SIGKILLed in the middle of a job: is the job run again within a minute?",
        "",
        "| contestant | run again |",
        "|---|---|",
    ]
    out += [f"| {n} | {s['kill'][n][0]} |" for n in names if n in s["kill"]]
    return out + [
        "",
        "An 8 s job; its process is SIGKILLed as soon as the job starts. A process without a "
        "supervisor of its own (an RQ SimpleWorker, an arq worker) is started again by the harness, "
        "as systemd would; tprocess runs with `job_timeout = 20` (default 300 s).",
        "",
    ]


def _targets(s: dict) -> list[str]:
    tp = "tprocess (Redis)"
    rows = []
    rate = _rate(s["throughput"], tp)
    peer_rates = {n: _rate(s["throughput"], n) for n in PEERS}
    peer_rates = {n: r for n, r in peer_rates.items() if r}
    floor = _rate(s["throughput"], "floor")
    if rate and peer_rates:
        best = max(peer_rates, key=peer_rates.get)
        ratio = rate / peer_rates[best]
        rows.append(
            (
                "throughput >= 2x the fastest peer",
                f"{ratio:.2f}x {best} ({_fmt(rate)} vs {_fmt(peer_rates[best])} jobs/s)",
                ratio >= 2,
            )
        )
    if rate and floor:
        rows.append(
            (
                "throughput within 1.5x of the floor",
                f"floor / tprocess = {floor / rate:.2f}",
                floor / rate <= 1.5,
            )
        )
    lat = s["latency"]
    if lat.get(tp):
        p99 = _med([r["p99"] for r in lat[tp]])
        peers = {n: _med([r["p99"] for r in lat[n]]) for n in PEERS if lat.get(n)}
        if peers:
            lowest = min(peers, key=peers.get)
            rows.append(
                (
                    "p99 latency below every peer's",
                    f"{p99:.2f} ms vs {peers[lowest]:.2f} ms ({lowest})",
                    p99 < peers[lowest],
                )
            )
    a_tp, a_floor = _secs(s["async"], tp), _secs(s["async"], "floor")
    if a_tp and a_floor:
        rows.append(
            (
                "async within 1.5x of the floor",
                f"{a_tp:.2f} s vs {a_floor:.2f} s = {a_tp / a_floor:.2f}x",
                a_tp / a_floor <= 1.5,
            )
        )
    put = _med(s["put_many"].get(tp, []))
    if put:
        rows.append(("put_many >= 50,000 jobs/s (Redis)", f"{put:,.0f} jobs/s", put >= 50_000))
    put_sqlite = _med(s["put_many"].get("tprocess (SQLite)", []))
    if put_sqlite:
        rows.append(("put_many >= 50,000 jobs/s (SQLite)", f"{put_sqlite:,.0f} jobs/s", put_sqlite >= 50_000))
    if not rows:
        return []
    out = ["### The issue's targets (tprocess on Redis)", "", "| target | measured | |", "|---|---|---|"]
    out += [f"| {t} | {m} | {'met' if ok else 'missed'} |" for t, m, ok in rows]
    return out + [""]
