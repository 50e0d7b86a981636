"""The metrics process: serves an instance's Prometheus metrics over HTTP.

    python -m tprocess.metrics --name NAME --listen HOST:PORT [--parent PID]

The master fork+execs it (a fresh interpreter: none of the master's memory, and
its own HTTP threads never meet the master's forks). On each scrape it asks the
master for {"cmd": "status"} over the control socket and converts the answer;
the master answers from its event loop, so a scrape costs it one status request
and the task path nothing. A master that does not answer gives `tprocess_up 0`
and nothing else: never an HTTP error, never a hang.

It holds the instance's marker memfd (passed through exec on purpose), so that
`start` and `stop` find it in /proc if its master was killed; it also asks for
SIGTERM at its parent's death (PR_SET_PDEATHSIG), so it does not outlive the master.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.utils import floatToGoString

from . import control, libc, logs, proctitle, worker
from .config import ConfigError
from .listen import parse_address, show_address

STATUS_TIMEOUT = 2.0  # seconds a scrape waits for the master before reporting it down
EXIT_CANNOT_LISTEN = 2
STATES = ("starting", "idle", "busy", "stopping", "backoff", "failed", "stopped")


# --- status -> metric families ----------------------------------------------------------------


def families_from_status(instance: str, status: dict[str, Any]) -> list[Metric]:
    """Every metric of one status answer; groups[] fields are used when the master has them,
    else the same figures are summed from workers[]."""
    workers = status.get("workers") or []
    groups = _groups(status, workers)
    tasks = CounterMetricFamily("tprocess_tasks", "Tasks completed, by group.",
                                labels=["instance", "group"])
    errors = CounterMetricFamily("tprocess_task_errors", "Tasks that raised, by group.",
                                 labels=["instance", "group"])
    states = GaugeMetricFamily("tprocess_workers", "Workers by group and state.",
                               labels=["instance", "group", "state"])
    restarts = CounterMetricFamily("tprocess_restarts", "Worker restarts by group and reason.",
                                   labels=["instance", "group", "reason"])
    durations = HistogramMetricFamily("tprocess_task_duration_seconds", "Task duration, by group.",
                                      labels=["instance", "group"])
    for name, group in groups.items():
        mine = [w for w in workers if w.get("group", "") == name]
        labels = [instance, name]
        tasks.add_metric(labels, _total(group, mine, "tasks"))
        errors.add_metric(labels, _total(group, mine, "errors"))
        for state, count in _states(group, mine).items():
            states.add_metric([*labels, state], count)
        for reason, count in sorted((group.get("restarts") or {}).items()):
            restarts.add_metric([*labels, reason], count)
        histogram = _histogram(group.get("durations"))
        if histogram is not None:
            durations.add_metric(labels, *histogram)
    master = status.get("master") or {}
    uptime = GaugeMetricFamily("tprocess_master_uptime_seconds", "Seconds since the master started.",
                               labels=["instance"])
    uptime.add_metric([instance], float(master.get("uptime") or 0.0))
    found = [_up(instance, 1), uptime, tasks, errors, states]
    return found + [f for f in (restarts, durations) if f.samples]


def _groups(status: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Groups by name, in the master's order; from the workers' names on a master without groups[]."""
    if status.get("groups") is not None:
        return {g.get("name", ""): g for g in status["groups"]}
    return {w.get("group", ""): {} for w in workers}


def _total(group: dict[str, Any], workers: list[dict[str, Any]], key: str) -> float:
    if group.get(key) is not None:
        return float(group[key])
    return float(sum(w.get(key) or 0 for w in workers))


def _states(group: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, int]:
    """Every state with a count, zeros included, so each series exists from the first scrape."""
    counts = dict.fromkeys(STATES, 0)
    if group.get("states") is not None:
        counts.update(group["states"])
    else:
        for w in workers:
            counts[w.get("state", "stopped")] = counts.get(w.get("state", "stopped"), 0) + 1
    return counts


def _histogram(durations: dict[str, Any] | None) -> tuple[list[tuple[str, float]], float] | None:
    """Per-bucket counts (the last one +Inf) made cumulative, as Prometheus wants them."""
    if not durations:
        return None
    bounds = [*(floatToGoString(b) for b in durations["bounds"]), "+Inf"]
    counts = durations["counts"]
    if len(counts) != len(bounds):
        raise ValueError(f"durations: {len(counts)} counts for {len(bounds)} buckets")
    buckets, running = [], 0.0
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        buckets.append((bound, running))
    return buckets, float(durations["sum"])


def _up(instance: str, value: int) -> GaugeMetricFamily:
    up = GaugeMetricFamily("tprocess_up", "1 if the master answered this scrape, else 0.",
                           labels=["instance"])
    up.add_metric([instance], value)
    return up


class StatusCollector:
    """A prometheus_client collector that asks the master at each scrape."""

    def __init__(self, instance: str, timeout: float = STATUS_TIMEOUT) -> None:
        self.instance = instance
        self.timeout = timeout
        self._warned = False

    def collect(self) -> Iterator[Metric]:
        try:
            _, status = control.request(self.instance, {"cmd": "status"}, self.timeout)
            found = families_from_status(self.instance, status)
        except (control.NotRunning, OSError, ValueError) as exc:
            self._warn_once(f"the master did not answer: {exc or type(exc).__name__}")
            found = [_up(self.instance, 0)]
        except Exception as exc:  # noqa: BLE001 - an odd answer must not turn into an HTTP 500
            self._warn_once(f"cannot read the master's status: {type(exc).__name__}: {exc}")
            found = [_up(self.instance, 0)]
        else:
            self._warned = False
        yield from found

    def _warn_once(self, message: str) -> None:
        """One line when the master stops answering, not one per scrape."""
        if not self._warned:
            logs.log.warning("%s", message)
            self._warned = True


# --- the process ------------------------------------------------------------------------------


def _arguments(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tprocess.metrics",
                                     description="Serve a tprocess instance's Prometheus metrics.")
    parser.add_argument("--name", required=True, help="the instance's name")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    parser.add_argument("--parent", type=int, default=0,
                        help="the master's pid: exit at once if it is already gone")
    return parser.parse_args(None if argv is None else list(argv))


def _become_metrics_process(name: str, parent: int) -> bool:
    """Title, logs, signals; False if the master died before PDEATHSIG could be set."""
    title = f"{name}-metrics"
    proctitle.setproctitle(title)
    logs.set_title(title)
    logs.configure()
    libc.set_death_signal(signal.SIGTERM)  # when the master dies
    # a Ctrl-C to the foreground group, or a SIGHUP, is for the master: it stops us last
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # blocked before any thread starts, so only sigwait below receives it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return not parent or os.getppid() == parent


def main(argv: Iterable[str] | None = None) -> int:
    args = _arguments(argv)
    if not _become_metrics_process(args.name, args.parent):
        return 0
    try:
        host, port = parse_address(args.listen, "--listen")
    except ConfigError as exc:
        logs.log.error("metrics: %s", exc)
        return EXIT_CANNOT_LISTEN
    registry = CollectorRegistry(auto_describe=False)  # no scrape at register time
    registry.register(StatusCollector(args.name))  # type: ignore[arg-type]
    where = show_address(host, port)
    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as exc:
        logs.log.error("metrics: cannot listen on %s: %s", where, exc.strerror or exc)
        return EXIT_CANNOT_LISTEN
    logs.log.info("serving metrics on http://%s/metrics", where)
    signal.sigwait({signal.SIGTERM})
    server.server_close()  # the serving thread is a daemon: no wait for its poll interval
    return 0


if __name__ == "__main__":
    # flush and leave without the interpreter's shutdown: the master's stop waits for this exit
    worker._exit(main())
