"""Prometheus metrics: the NAME-metrics process, its endpoint, its life and its settings.

End to end: real daemons started with `--metrics` or the `metrics` config key,
scraped over loopback HTTP and parsed with prometheus_client's own parser; the
process table is read from /proc. The conversion of a full status (groups,
histograms, restart reasons) is checked without a master.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from chaos_support import alive, assert_one_error_line, start
from helpers import TPROCESS, gone, instance_procs, process_table, wait_for, zombie_children
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tprocess import discovery
from tprocess.config import ConfigError
from tprocess.listen import parse_address
from tprocess.metrics import StatusCollector, families_from_status

QUICK = "def work(ctx):\n    ctx.sleep(0.01)\n"
# direct, not through a proxy that the environment may name: loopback only
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, timeout: float = 10.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    with OPENER.open(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def scrape_when_up(port: int, timeout: float = 20.0) -> dict:
    """The first scrape at which the endpoint answers and the master too."""
    def answered() -> dict | None:
        try:
            samples = scrape(port, timeout=5)
        except (urllib.error.URLError, ConnectionError):
            return None
        return samples if up(samples) == 1 else None
    return wait_for(answered, timeout, interval=0.05, what=f"metrics on port {port}")


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def up(samples: dict) -> float | None:
    return next((v for (n, _), v in samples.items() if n == "tprocess_up"), None)


def by_state(samples: dict, group: str) -> dict[str, float]:
    return {dict(labels)["state"]: v for (n, labels), v in samples.items()
            if n == "tprocess_workers" and dict(labels)["group"] == group}


def metrics_children(name: str, master_pid: int) -> list:
    return [p for p in process_table()
            if p.ppid == master_pid and p.title == f"{name}-metrics" and p.state != "Z"]


def one_metrics_child(name: str, master_pid: int, not_pid: int = 0):
    found = [p for p in metrics_children(name, master_pid) if p.pid != not_pid]
    return found[0] if len(found) == 1 else None


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_endpoint_counts_tasks_states_and_uptime_and_the_process_lives_and_dies_with_the_pool(inst):
    inst.write("jobs.py", QUICK)
    port = free_port()
    master = start(inst, "jobs.py:work", "-n", "3", "--metrics", f"127.0.0.1:{port}")
    child = wait_for(lambda: one_metrics_child(inst.name, master), 20, what="the metrics process")
    # it holds the instance's marker: found in /proc like a worker if its master were killed
    assert child.pid in {ref.pid for ref in discovery.find_instance(inst.name)}

    first = scrape_when_up(port)
    labels = {"instance": inst.name, "group": ""}
    assert value(first, "tprocess_master_uptime_seconds", instance=inst.name) > 0
    states = by_state(first, "")
    assert sum(states.values()) == 3, states
    tasks = value(first, "tprocess_tasks_total", **labels)
    assert tasks is not None and value(first, "tprocess_task_errors_total", **labels) == 0
    wait_for(lambda: value(scrape(port), "tprocess_tasks_total", **labels) > tasks, 20,
             what="tprocess_tasks_total to grow")

    # killed: restarted under the same title, as a child of the same master, after its backoff
    os.kill(child.pid, signal.SIGKILL)
    again = wait_for(lambda: one_metrics_child(inst.name, master, not_pid=child.pid), 20,
                     what="a new metrics process")
    scrape_when_up(port)
    assert not zombie_children(master)

    result = inst.stop("--timeout", "10")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert gone(again.pid) and gone(master)
    assert not instance_procs(inst.name), instance_procs(inst.name)
    log = inst.read_log()
    assert f"{inst.name}-metrics (pid {again.pid}) exited with code 0" in log and "Traceback" not in log


@pytest.mark.timeout(60)
def test_durations_and_restarts_by_reason_come_from_the_real_master(inst):
    inst.write("jobs.py", "import time\n\ndef work(ctx):\n    time.sleep(0.002)\n")
    port = free_port()
    inst.write("tprocess.toml", f'name = "{inst.name}"\nmin_uptime = 0\nmetrics = {port}\n'
                                '[groups.ip]\ntask = "jobs.py:work"\nworkers = 2\nmax_tasks = 500\n')
    master = start(inst, "-c", "tprocess.toml")
    victim = next(p for p in process_table() if p.ppid == master and p.title == f"{inst.name}-ip-0")
    os.kill(victim.pid, signal.SIGKILL)
    labels = {"instance": inst.name, "group": "ip"}

    def recycled() -> dict | None:
        samples = scrape_when_up(port)
        done = value(samples, "tprocess_restarts_total", reason="max_tasks", **labels)
        return samples if done and done >= 2 else None

    samples = wait_for(recycled, 30, what="workers recycled by max_tasks")
    assert value(samples, "tprocess_restarts_total", reason="crash", **labels) == 1
    count = value(samples, "tprocess_task_duration_seconds_count", **labels)
    fast = value(samples, "tprocess_task_duration_seconds_bucket", le="0.005", **labels)
    slow = value(samples, "tprocess_task_duration_seconds_bucket", le="0.001", **labels)
    assert count and count >= 1000 and fast and fast >= 0.9 * count and slow is not None and slow < fast
    # counters survive the recycling: the recycled workers' tasks are still counted (less the
    # one task per running worker that may end between the reading of the two counters)
    assert value(samples, "tprocess_tasks_total", **labels) >= count - 2
    assert inst.stop().returncode == 0


@pytest.mark.timeout(60)
def test_a_master_that_does_not_answer_is_up_0_quickly_never_an_error_or_a_hang(inst):
    inst.write("jobs.py", QUICK)
    port = free_port()
    master = start(inst, "jobs.py:work", "-n", "1", "--metrics", str(port))
    scrape_when_up(port)
    os.kill(master, signal.SIGSTOP)  # our own master, by pid: it accepts but never answers
    try:
        began = time.monotonic()
        samples = scrape(port, timeout=15)
        took = time.monotonic() - began
    finally:
        os.kill(master, signal.SIGCONT)
    assert list(samples) == [("tprocess_up", (("instance", inst.name),))], samples
    assert up(samples) == 0 and took < 8, took
    scrape_when_up(port)
    assert inst.stop("--timeout", "10").returncode == 0


@pytest.mark.timeout(60)
def test_config_key_gives_one_series_per_group_and_dies_with_a_killed_master(inst):
    inst.write("jobs.py", QUICK)
    port = free_port()
    inst.write("tprocess.toml", f'metrics = {port}\n[groups.ip]\ntask = "jobs.py:work"\nworkers = 2\n'
                                '[groups.domain]\ntask = "jobs.py:work"\nworkers = 1\n')
    master = start(inst, "-c", "tprocess.toml")
    child = wait_for(lambda: one_metrics_child(inst.name, master), 20, what="the metrics process")
    samples = scrape_when_up(port)
    assert sum(by_state(samples, "ip").values()) == 2
    assert sum(by_state(samples, "domain").values()) == 1
    for group in ("ip", "domain"):
        assert value(samples, "tprocess_tasks_total", instance=inst.name, group=group) is not None

    # the master's death ends it (PR_SET_PDEATHSIG), like the workers
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: gone(child.pid), 20, what="the metrics process to exit with its master")
    wait_for(lambda: not instance_procs(inst.name), 30, what="every worker to exit")


@pytest.mark.timeout(60)
def test_foreground_ctrl_c_to_the_group_stops_the_metrics_process_last_without_a_restart(inst):
    inst.write("jobs.py", QUICK)
    port = free_port()
    proc = subprocess.Popen(
        [TPROCESS, "start", "jobs.py:work", "-n", "2", "--name", inst.name, "--metrics", f":{port}"],
        cwd=inst.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    inst.foreground.append(proc)
    scrape_when_up(port)
    child = one_metrics_child(inst.name, proc.pid)
    assert child is not None and os.getpgid(child.pid) == proc.pid

    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the metrics process too
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert gone(child.pid) and not instance_procs(inst.name)
    assert f"{inst.name}-metrics (pid {child.pid}) exited with code 0" in err, err
    assert "restarting" not in err and "Traceback" not in err, err


@pytest.mark.timeout(60)
def test_metrics_are_off_by_default(inst):
    inst.write("jobs.py", QUICK)
    master = start(inst, "jobs.py:work", "-n", "1")
    inst.wait_workers(1)
    assert not metrics_children(inst.name, master)
    assert "metrics" not in inst.read_log()
    assert inst.stop("--timeout", "10").returncode == 0


@pytest.mark.parametrize("detach", [["-d"], []], ids=["daemon", "foreground"])
def test_a_port_in_use_fails_start_in_one_line_leaving_nothing(inst, detach):
    inst.write("jobs.py", QUICK)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = inst.run("start", "jobs.py:work", *detach, "--log-file", str(inst.log),
                          "--metrics", f"127.0.0.1:{port}", timeout=30)
    assert_one_error_line(result, f"metrics: cannot listen on 127.0.0.1:{port}", "Address already in use")
    assert not instance_procs(inst.name)
    # the lock was let go: the same name starts at once afterwards
    master = start(inst, "jobs.py:work", "-n", "1")
    assert alive(master) and inst.stop("--timeout", "10").returncode == 0


def _ipv6_loopback_port() -> int | None:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
            return sock.getsockname()[1]
    except OSError:
        return None


@pytest.mark.timeout(60)
def test_ipv6_loopback_address(inst):
    port = _ipv6_loopback_port()
    if port is None:
        pytest.skip("no IPv6 loopback here")
    inst.write("jobs.py", QUICK)
    master = start(inst, "jobs.py:work", "--metrics", f"[::1]:{port}")
    wait_for(lambda: one_metrics_child(inst.name, master), 20, what="the metrics process")

    def scraped() -> bool:
        try:
            with OPENER.open(f"http://[::1]:{port}/metrics", timeout=5) as response:
                return f'tprocess_up{{instance="{inst.name}"}} 1.0' in response.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return False
    wait_for(scraped, 20, interval=0.05, what="metrics on [::1]")
    assert inst.stop("--timeout", "10").returncode == 0


@pytest.mark.parametrize("line,needles", [
    ('metrics = "host:notaport"', ["tprocess.toml", "metrics", "'notaport'"]),
    ("metrics = 70000", ["tprocess.toml", "metrics", "70000", "65535"]),
    ("metrics = true", ["tprocess.toml", "metrics", "True"]),
    ("metrics = 0", ["tprocess.toml", "metrics", "port 0"]),
    ('metrics = "::1:9100"', ["tprocess.toml", "metrics", "'::1:9100'", "[IPV6]:PORT"]),
    ('metrics = "[nothex]:9100"', ["tprocess.toml", "metrics", "HOST:PORT"]),
    ('metrics = "[1::2::3]:9100"', ["tprocess.toml", "metrics", "IPv6"]),
    ("metrics = 9100.5", ["tprocess.toml", "metrics", "9100.5"]),
])
def test_bad_metrics_values_are_one_line_config_errors(inst, line, needles):
    inst.write("jobs.py", QUICK)
    inst.write("tprocess.toml", f'{line}\n[groups.a]\ntask = "jobs.py:work"\n')
    result = inst.run("start", "-c", "tprocess.toml", "-d", "--log-file", str(inst.log), timeout=30)
    assert_one_error_line(result, *needles)
    assert not instance_procs(inst.name)


def test_bad_metrics_flag_and_unknown_host_are_one_line_errors(inst):
    inst.write("jobs.py", QUICK)
    bad = inst.run("start", "jobs.py:work", "-d", "--metrics", "localhost:", timeout=30)
    assert_one_error_line(bad, "metrics", "port ''")
    nohost = inst.run("start", "jobs.py:work", "-d", "--metrics", "no-such-host.invalid:9100", timeout=30)
    assert_one_error_line(nohost, "metrics: cannot listen on no-such-host.invalid:9100")
    assert not instance_procs(inst.name)


def test_metrics_without_prometheus_client_says_what_to_install(inst):
    inst.write("jobs.py", QUICK)
    hidden = inst.dir / "hide"
    hidden.mkdir()
    # makes `import prometheus_client` fail in the command, as if it were not installed
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['prometheus_client'] = None\n")
    result = inst.run("start", "jobs.py:work", "-d", "--metrics", str(free_port()), timeout=30,
                      env={"PYTHONPATH": str(hidden)})
    assert_one_error_line(result, "metrics", "pip install 'tprocess[metrics]'")
    assert not instance_procs(inst.name)


# --- without a master ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("9100", ("127.0.0.1", 9100)),
    (":9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:65535", ("::1", 65535)),
    (9100, ("127.0.0.1", 9100)),
])
def test_addresses_accepted(text, expected):
    assert parse_address(text, "metrics") == expected


@pytest.mark.parametrize("text", ["", ":", "9100:", "a:b:c", "[::1]", "1" * 7, "٩١٠٠", "host :1", 65536, -1,
                                  None, [9100], "x\n:1"])
def test_addresses_refused_in_one_line(text):
    with pytest.raises(ConfigError) as caught:
        parse_address(text, "f.toml: metrics")
    assert str(caught.value).startswith("f.toml: metrics: ") and "\n" not in str(caught.value)


FULL_STATUS = {
    "name": "x",
    "master": {"pid": 1, "state": "running", "uptime": 12.5, "generation": 2},
    "groups": [
        {"name": "ip", "workers": 3, "running": 3, "tasks": 40, "errors": 2,
         "restarts": {"crash": 1, "task_timeout": 0, "reload": 3},
         "states": {"idle": 1, "busy": 2, "starting": 0, "stopping": 0, "backoff": 0, "failed": 0},
         "durations": {"bounds": [0.1, 1.0], "counts": [30, 8, 2], "sum": 9.5, "count": 40}},
        {"name": "", "workers": 1, "running": 1, "tasks": 5, "errors": 0, "restarts": {},
         "states": {"idle": 1}, "durations": None},
    ],
    "workers": [],  # ignored when groups[] carries the figures
}


def _render(status: dict) -> dict:
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):
            return families_from_status("x", status)

    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_full_status_gives_counters_histogram_and_restart_reasons():
    samples = _render(FULL_STATUS)
    ip = {"instance": "x", "group": "ip"}
    assert value(samples, "tprocess_up", instance="x") == 1
    assert value(samples, "tprocess_master_uptime_seconds", instance="x") == 12.5
    assert value(samples, "tprocess_tasks_total", **ip) == 40
    assert value(samples, "tprocess_task_errors_total", **ip) == 2
    assert value(samples, "tprocess_tasks_total", instance="x", group="") == 5
    assert value(samples, "tprocess_restarts_total", **ip, reason="reload") == 3
    assert value(samples, "tprocess_restarts_total", **ip, reason="crash") == 1
    assert by_state(samples, "ip")["busy"] == 2 and sum(by_state(samples, "ip").values()) == 3
    # per-bucket counts become cumulative; +Inf equals the count
    assert value(samples, "tprocess_task_duration_seconds_bucket", **ip, le="0.1") == 30
    assert value(samples, "tprocess_task_duration_seconds_bucket", **ip, le="1.0") == 38
    assert value(samples, "tprocess_task_duration_seconds_bucket", **ip, le="+Inf") == 40
    assert value(samples, "tprocess_task_duration_seconds_count", **ip) == 40
    assert value(samples, "tprocess_task_duration_seconds_sum", **ip) == 9.5
    # no histogram for a group without durations
    assert value(samples, "tprocess_task_duration_seconds_count", instance="x", group="") is None


def test_status_of_the_current_master_shape_is_summed_from_workers():
    status = {"name": "x", "master": {"pid": 1, "state": "running", "uptime": 3.0}, "workers": [
        {"name": "x-a-0", "group": "a", "state": "busy", "tasks": 4, "errors": 1},
        {"name": "x-a-1", "group": "a", "state": "backoff", "tasks": 6, "errors": 0},
        {"name": "x-b-0", "group": "b", "state": "idle", "tasks": 1, "errors": 0},
    ]}
    samples = _render(status)
    assert value(samples, "tprocess_tasks_total", instance="x", group="a") == 10
    assert value(samples, "tprocess_task_errors_total", instance="x", group="a") == 1
    assert by_state(samples, "a") == {**dict.fromkeys(by_state(samples, "a"), 0), "busy": 1, "backoff": 1}
    assert not any(n.startswith(("tprocess_restarts", "tprocess_task_duration")) for n, _ in samples)


def test_an_instance_that_is_not_running_is_up_0_and_nothing_else():
    families = list(StatusCollector("tnosuchinstance-x9", timeout=1.0).collect())
    assert [f.name for f in families] == ["tprocess_up"] and families[0].samples[0].value == 0


def test_an_odd_answer_is_up_0_not_an_error(monkeypatch):
    from tprocess import control

    monkeypatch.setattr(control, "request", lambda *a, **k: (1, {"groups": [{"durations": {"x": 1}}]}))
    families = list(StatusCollector("x").collect())
    assert [f.name for f in families] == ["tprocess_up"] and families[0].samples[0].value == 0
