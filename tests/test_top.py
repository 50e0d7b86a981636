"""`tprocess top` under a real pseudo-terminal, and the pure pieces behind it."""

from __future__ import annotations

import fcntl
import io
import json
import os
import select
import signal
import struct
import subprocess
import termios
import time

import pytest
from helpers import TPROCESS, wait_for
from rich.console import Console

from tprocess import control, status_view, top_view

SLEEPER = """
def work(ctx):
    ctx.sleep(5)
"""
COLS, LINES = 160, 40


class TopRun:
    """`tprocess top` with a pty as its controlling terminal, stdin and stdout."""

    def __init__(self, inst, *args: str) -> None:
        self.master_fd, self.slave_fd = os.openpty()
        fcntl.ioctl(self.slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLS, 0, 0))
        self.modes_before = termios.tcgetattr(self.slave_fd)
        env = dict(os.environ, TERM="xterm", COLUMNS=str(COLS), LINES=str(LINES))
        self.proc = subprocess.Popen(
            [TPROCESS, "top", "--name", inst.name, *args], cwd=inst.dir, env=env,
            stdin=self.slave_fd, stdout=self.slave_fd, stderr=self.slave_fd,
            start_new_session=True, preexec_fn=_take_controlling_terminal,
        )
        self.output = bytearray()

    def read_until(self, predicate, timeout: float = 20.0, what: str = "output") -> bytes:
        """Drain the pty (so top never blocks writing) until predicate(output) holds."""
        def drained():
            while select.select([self.master_fd], [], [], 0.05)[0]:
                try:
                    chunk = os.read(self.master_fd, 65536)
                except OSError:  # EIO: every writer of the slave side is gone
                    break
                if not chunk:
                    break
                self.output += chunk
            return predicate(bytes(self.output))
        wait_for(drained, timeout, interval=0.0, what=what)
        return bytes(self.output)

    def in_cbreak(self) -> bool:
        return not termios.tcgetattr(self.slave_fd)[3] & termios.ICANON

    def wait_exit(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "top did not exit"
            self.read_until(lambda out: True, timeout=1)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master_fd)
        os.close(self.slave_fd)


def _take_controlling_terminal() -> None:
    # runs in the child after setsid: the pty on fd 0 becomes its terminal, so ^C is a real SIGINT
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def top_of(inst):
    runs: list[TopRun] = []

    def spawn(*args: str) -> TopRun:
        run = TopRun(inst, *args)
        runs.append(run)
        return run
    yield spawn
    for run in runs:
        run.close()


def _titles_drawn(inst, workers: int):
    titles = [f"{inst.name}-master", *(f"{inst.name}-{i}" for i in range(workers))]
    return lambda out: all(t.encode() in out for t in titles)


@pytest.mark.timeout(60)
def test_top_draws_the_instance_and_q_quits_restoring_the_terminal(inst, top_of):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "3")
    master = inst.master()
    top = top_of("--interval", "0.2")
    out = top.read_until(_titles_drawn(inst, 3), what="the titles drawn by top")
    assert f"pid {master.pid}".encode() in out
    assert top.in_cbreak(), "top reads keys one by one: the terminal must be in cbreak mode"
    os.write(top.master_fd, b"q")
    assert top.wait_exit() == 0, top.output[-2000:]
    assert termios.tcgetattr(top.slave_fd) == top.modes_before
    assert inst.master().pid == master.pid, "top must leave the instance alone"


@pytest.mark.timeout(60)
def test_top_ctrl_c_and_sigint_exit_0_restoring_the_terminal(inst, top_of):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "2")
    for interrupt in ("ctrl-c", "sigint"):
        top = top_of()
        top.read_until(_titles_drawn(inst, 2), what="the titles drawn by top")
        assert top.in_cbreak()
        if interrupt == "ctrl-c":
            os.write(top.master_fd, b"\x03")  # the terminal driver sends SIGINT to top
        else:
            os.kill(top.proc.pid, signal.SIGINT)
        assert top.wait_exit() == 0, (interrupt, top.output[-2000:])
        assert termios.tcgetattr(top.slave_fd) == top.modes_before, interrupt
        assert b"Traceback" not in top.output


@pytest.mark.timeout(60)
def test_top_leaves_when_the_instance_stops(inst, top_of):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "2")
    master = inst.master()
    top = top_of("--interval", "0.2")
    top.read_until(_titles_drawn(inst, 2), what="the titles drawn by top")
    assert inst.stop().returncode == 0
    assert top.wait_exit() == 0, top.output[-2000:]
    assert f"tprocess '{inst.name}' stopped (master pid {master.pid} is gone)".encode() in top.output
    assert termios.tcgetattr(top.slave_fd) == top.modes_before


def test_top_of_an_instance_not_running_is_one_error_line(inst):
    result = subprocess.run([TPROCESS, "top", "--name", inst.name], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr == f"tprocess: error: tprocess '{inst.name}' is not running\n"
    assert result.stdout == ""


def test_top_refuses_a_bad_interval(inst):
    result = subprocess.run([TPROCESS, "top", "--name", inst.name, "--interval", "0"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.startswith("tprocess: error: --interval:") and result.stderr.count("\n") == 1


def test_status_table_has_task_and_reason_columns_and_group_lines(inst):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "2")
    inst.wait_workers(2)
    result = inst.run("status")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("NAME"))
    assert header.split() == list(status_view.COLUMNS)
    assert "group (unnamed): 2/2 workers" in result.stdout
    inst.stop()


# --- rendering and the pure pieces -----------------------------------------------------------------


def synthetic_status(workers: int, groups: bool = True) -> dict:
    rows = [{"name": f"big-ip-{i}", "group": "ip", "index": i, "pid": 4_000_000 + i,
             "state": "busy" if i % 7 == 0 else "idle", "uptime": 100.0, "tasks": i, "errors": 0,
             "restarts": i % 3, "failures": 0, "task_time": float(i % 50) if i % 7 == 0 else None,
             "last_reason": "crash" if i % 3 else None, "generation": 1} for i in range(workers)]
    status = {"name": "big", "master": {"pid": os.getpid(), "state": "running", "uptime": 3600.0,
                                        "generation": 1},
              "workers": rows, "log_tail": [f"log line {i}" for i in range(20)]}
    if groups:
        status["groups"] = [{"name": "ip", "workers": workers, "running": workers, "tasks": 1000,
                             "errors": 2, "restarts": {"crash": 4, "max_tasks": 0, "reload": 1},
                             "states": {"idle": workers - 1, "busy": 1}}]
    return status


def draw(model: top_view.TopModel, width: int = 120, height: int = 40) -> list[str]:
    console = Console(file=io.StringIO(), width=width, height=height, color_system=None)
    console.print(top_view.render(model, width, height))
    return console.file.getvalue().splitlines()


def test_render_of_500_workers_fits_the_terminal_busiest_first():
    model = top_view.TopModel("big", 1.0)
    model.update(os.getpid(), synthetic_status(500), time.monotonic())
    lines = draw(model, 120, 40)
    assert len(lines) <= 40, "\n".join(lines)
    assert all(len(line) <= 120 for line in lines)
    more = [line for line in lines if line.startswith("... and ")]
    assert more and more[0].split()[2].isdigit() and int(more[0].split()[2]) > 450, more
    first_worker = next(line for line in lines if line.startswith("big-ip-"))
    assert first_worker.split()[0] == "big-ip-49", "the longest-running task is shown first"
    assert "log line 19" in "\n".join(lines) and "crash 4, reload 1" in "\n".join(lines)


def test_log_lines_cannot_drive_the_terminal():
    model = top_view.TopModel("big", 1.0)
    status = synthetic_status(3)
    status["log_tail"] = ["plain", "red \x1b[31mtext\x1b[0m and a bell \x07", ["not", "a string"]]
    model.update(os.getpid(), status, time.monotonic())
    console = Console(file=io.StringIO(), width=100, height=30, force_terminal=True)
    console.print(top_view.render(model, 100, 30))
    out = console.file.getvalue()
    assert "\x1b[31m" not in out and "\x07" not in out and "red ?[31mtext" in out


def test_render_fits_small_terminals_and_never_crashes_on_missing_fields():
    model = top_view.TopModel("bare", 1.0)
    bare = {"master": {"pid": 1}, "workers": [{"name": "bare-0"}, {"pid": None}, {}]}
    for status in (bare, {"master": {}}, {}, synthetic_status(30, groups=False)):
        model.update(1, status, time.monotonic())
        model.update(1, status, time.monotonic() + 1)
        for height in (10, 25):
            assert len(draw(model, 80, height)) <= height


def test_sparkline_scales_to_the_largest_and_squeezes_to_its_width():
    assert top_view.sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█"
    assert top_view.sparkline([0, 0]) == "▁▁"
    assert top_view.sparkline([None, 3]) == " █"
    assert top_view.sparkline([]) == ""
    assert len(top_view.sparkline(list(range(120)), width=30)) == 30


def test_rates_from_worker_counters_never_go_negative_when_a_worker_is_replaced():
    tracker = top_view.RateTracker()
    worker = lambda name, pid, tasks: {"name": name, "group": "g", "pid": pid, "tasks": tasks}  # noqa: E731
    assert tracker.sample({"workers": [worker("w0", 10, 100), worker("w1", 11, 50)]}, 0.0) == {"g": None}
    # w0 replaced: its counter starts again from 0 and reaches 5; w1 did 10 more, in 2 seconds
    rates = tracker.sample({"workers": [worker("w0", 12, 5), worker("w1", 11, 60)]}, 2.0)
    assert rates == {"g": 7.5}
    assert tracker.average("g") == 7.5 and tracker.rates("g") == [7.5]


def test_rates_from_group_counters_average_over_the_window():
    tracker = top_view.RateTracker(window=60.0)
    for t, tasks in ((0.0, 0), (1.0, 10), (2.0, 30), (3.0, 20)):  # the last: a scale-down, no progress
        tracker.sample({"groups": [{"name": "ip", "tasks": tasks}]}, t)
    assert tracker.rates("ip") == [10.0, 20.0, 0.0]
    assert tracker.average("ip") == pytest.approx(10.0)
    tracker.sample({"groups": [{"name": "ip", "tasks": 20}]}, 200.0)  # older samples leave the window
    assert tracker.rates("ip") == [0.0]


def test_cpu_percent_from_proc_stat_deltas():
    before = top_view.ProcStat(ticks=100, start=5, rss=0)
    after = top_view.ProcStat(ticks=100 + top_view.CLOCK_TICKS, start=5, rss=0)
    assert top_view.cpu_percent(before, after, 2.0) == pytest.approx(50.0)
    assert top_view.cpu_percent(None, after, 2.0) is None
    assert top_view.cpu_percent(top_view.ProcStat(100, 4, 0), after, 2.0) is None  # a reused pid
    mine = top_view.read_proc_stat(os.getpid())
    assert mine is not None and mine.rss > 0


def test_status_table_of_2000_workers_is_fast():
    status = synthetic_status(2000)
    out = io.StringIO()
    began = time.monotonic()
    status_view.render(status, Console(file=out, width=80))
    took = time.monotonic() - began
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 + 1 + 2000 + 1  # title, header, master, workers, one group line
    assert all(not line.endswith(" ") for line in lines)
    assert took < 1.0, took  # about 0.1 s here; generous for a loaded machine
    json.dumps(status)  # the synthetic dict is what a master would send


@pytest.mark.timeout(60)
def test_top_to_a_pipe_prints_samples_until_sigint(inst):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "2")
    proc = subprocess.Popen([TPROCESS, "top", "--name", inst.name, "--interval", "0.2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = bytearray()

        def samples(count: int):
            def enough() -> bool:
                if select.select([proc.stdout], [], [], 0.05)[0]:
                    out.extend(os.read(proc.stdout.fileno(), 65536))
                return out.count(f"{inst.name}-master".encode()) >= count
            return enough
        wait_for(samples(2), 20, interval=0.0, what="two samples of top in the pipe")
        assert f"{inst.name}-1".encode() in out and b"\x1b[" not in out, "a pipe gets plain text"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def last_frame(output: bytes) -> list[str]:
    """The lines of the last whole screen drawn (each redraw starts at the home position)."""
    frames = output.split(b"\x1b[H")
    complete = [f for f in frames if b"more workers" in f]
    return complete[-1].decode(errors="replace").split("\n") if complete else []


@pytest.mark.timeout(90)
def test_top_of_500_workers_fits_the_terminal(inst, top_of):
    inst.write("jobs.py", SLEEPER)
    inst.start("jobs.py:work", "-n", "500", timeout=60)
    top = top_of("--interval", "0.5")
    out = top.read_until(lambda out: b"more workers" in out, 30, what="the '... and K more' line")
    frame = last_frame(out)
    assert 10 < len(frame) <= LINES, frame
    assert any(line.startswith(f"{inst.name}-") for line in frame)
    os.write(top.master_fd, b"q")
    assert top.wait_exit() == 0
    assert inst.stop(timeout=60).returncode == 0


@pytest.mark.timeout(30)
def test_the_log_tail_top_shows_has_the_masters_and_the_workers_lines(inst):
    """print() without flush: a worker's stdout is line-buffered, so the line arrives at once."""
    inst.write("jobs.py", "def work(ctx):\n    print('hello from', ctx.name)\n    ctx.sleep(3600)\n")
    inst.start("jobs.py:work", "-n", "2")
    inst.wait_workers(2)

    def tail():
        _, reply = control.request(inst.name, {"cmd": "status", "log_lines": 50})
        lines = reply.get("log_tail", [])
        said = [line for line in lines if " OUT hello from " in line]
        return lines if len(said) == 2 and any("starting 2 workers" in line for line in lines) else None

    lines = wait_for(tail, 10, what="the workers' lines in the log tail")
    assert all(line[:4].isdigit() for line in lines), lines  # whole log lines, each with its time
    assert inst.stop().returncode == 0
