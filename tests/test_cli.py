"""The command line: usage mistakes, the fast path's imports, and `logs`, `reload`, `scale`.

reload and scale are checked against a listening socket that the test binds
under the instance's own address (control.address): the test sees exactly
the request that reaches it and answers as the master would.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from chaos_support import assert_one_error_line
from helpers import TPROCESS, instance_procs, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from tprocess import cli, control, logtail

# --- a socket in the master's place ---------------------------------------------------------


class FakeMaster:
    """Listens at the instance's control address; answers each request with the next reply."""

    def __init__(self, name: str, replies: list[dict | None]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(control.address(name))
        self.listener.listen(8)
        self.listener.settimeout(30)
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        for reply in self.replies:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                if reply is not None:  # None: close without answering, as a dying master would
                    conn.sendall(json.dumps(reply).encode())

    def nothing_reached(self) -> bool:
        """True if no client connected (checked after the client has exited)."""
        self.listener.setblocking(False)
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return True
        conn.close()
        return False


@contextmanager
def fake_master(name: str, *replies: dict | None, serve: bool = True) -> Iterator[FakeMaster]:
    master = FakeMaster(name, list(replies))
    if serve:
        master.thread.start()
    try:
        yield master
    finally:
        master.listener.close()
        if serve:
            master.thread.join(10)


def tp(inst, command: str, *args: str, env: dict[str, str] | None = None,
       timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return inst.run(command, "--name", inst.name, *args, env=env, timeout=timeout)


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    pytest.param(["scale", "abc"], ["COUNT", "'abc'"], id="scale-word"),
    pytest.param(["scale", "ip", "1.5"], ["COUNT", "'1.5'"], id="scale-fraction"),
    pytest.param(["scale", "ip", "--5"], ["--5"], id="scale-double-dash"),
    pytest.param(["scale", "+0"], ["COUNT", "'+0'"], id="scale-plus-zero"),
    pytest.param(["scale", "-0"], ["COUNT", "'-0'"], id="scale-minus-zero"),
    pytest.param(["scale", "ip", ""], ["COUNT", "''"], id="scale-empty"),
    pytest.param(["scale", "ip", " 5"], ["COUNT", "' 5'"], id="scale-space"),
    pytest.param(["scale"], ["COUNT"], id="scale-no-count"),
    pytest.param(["scale", "a", "b", "c"], ["unrecognized arguments: c"], id="scale-three-words"),
    pytest.param(["reload", "now"], ["unrecognized arguments: now"], id="reload-extra-word"),
    pytest.param(["logs", "-n", "-3"], ["-n/--lines", "'-3'"], id="logs-negative"),
    pytest.param(["logs", "-n", "ten"], ["-n/--lines", "'ten'"], id="logs-word"),
    pytest.param(["logs", "--lines"], ["--lines"], id="logs-no-value"),
    pytest.param(["logs", "--bogus"], ["--bogus"], id="logs-unknown-option"),
    pytest.param(["stop", "--timeout", "-inf"], ["--timeout", "inf"], id="stop-minus-inf"),
])
def test_usage_mistakes_are_one_line_and_send_nothing(inst, args, needles):
    command, *rest = args
    with fake_master(inst.name, serve=False) as master:
        result = tp(inst, command, *rest)
        assert master.nothing_reached()
    assert_one_error_line(result, *needles)
    assert result.stdout == ""


@pytest.mark.parametrize("args,needles", [
    pytest.param([], ["missing command"], id="no-command"),
    pytest.param(["restart"], ["'restart'"], id="unknown-command"),
    pytest.param(["--bogus", "status"], ["'--bogus'"], id="unknown-option"),
])
def test_missing_or_unknown_command(inst, args, needles):
    assert_one_error_line(inst.run(*args, name=False), *needles)


def test_help_and_version_exit_0():
    commands = ("start", "stop", "status", "logs", "reload", "scale")
    for args in (["-h"], ["--help"], *([command, "-h"] for command in commands)):
        result = subprocess.run([TPROCESS, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.startswith("usage: tprocess"), (args, result)
        assert result.stderr == ""
    version = subprocess.run([TPROCESS, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("tprocess, version ")
    # `--version` alone is answered before argparse; argparse's answer is the same line
    twice = subprocess.run([TPROCESS, "--version", "--version"], capture_output=True, text=True, timeout=30)
    assert twice.returncode == 0 and twice.stdout == version.stdout


FORBIDDEN_ON_THE_FAST_PATH = {  # inspect stands in sys.modules until used: its ast and dis tell
    "click", "rich", "psutil", "typing", "dataclasses", "ast", "dis", "logging", "shutil", "tomllib",
    "tprocess.config", "tprocess.supervisor", "tprocess.master", "tprocess.logs",
}


@pytest.mark.parametrize("args", [["status"], ["stop"], ["scale", "3"], ["reload"]])
def test_fast_commands_import_nothing_heavy(inst, args):
    """What stop/status/scale/reload import decides how fast they answer (see bench/cli_startup.py)."""
    argv = [args[0], "--name", inst.name, *args[1:]]
    code = ("import sys\nfrom tprocess.cli import run\n"
            f"try:\n    run({argv!r})\nexcept Exception:\n    pass\n"
            "print(' '.join(sorted(sys.modules)), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    loaded = set(result.stderr.split())
    assert "tprocess.cli" in loaded, result.stderr
    assert ("argparse" in loaded) == (args[0] not in cli.PLAIN_FORMS), result.stderr
    assert not loaded & FORBIDDEN_ON_THE_FAST_PATH, sorted(loaded & FORBIDDEN_ON_THE_FAST_PATH)


NOT_BEFORE_THE_REQUEST = {"argparse", "re", "enum", "socket", "selectors", "json", "struct"}


@pytest.mark.parametrize("args", [["stop"], ["stop", "--timeout", "20"], ["status"], ["status", "--json"]])
def test_stop_and_status_send_their_request_before_any_heavy_import(inst, args):
    """The request reaches the master after a bare interpreter's start-up and tprocess's own
    small modules; argparse, re, enum, socket.py and json (~12 ms together) would come first
    otherwise (issue 8: a `stop` is its command's start-up plus the pool's)."""
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(60)\n")
    inst.start("jobs.py:work", "-n", "1")
    argv = [args[0], "--name", inst.name, *args[1:]]
    code = ("import sys\nfrom tprocess import cli, control\n"
            "send = control.send\n"
            "def spy(sock, message):\n"
            "    print('loaded:', ' '.join(sorted(sys.modules)), file=sys.stderr)\n"
            "    send(sock, message)\n"
            "control.send = spy\n"
            f"code = cli.run({argv!r})\n"
            "print('at the end:', ' '.join(sorted(sys.modules)), file=sys.stderr)\n"
            "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    before, _, after = result.stderr.split("loaded:", 1)[1].partition("at the end:")
    loaded = set(before.split())
    assert "tprocess.control" in loaded and not loaded & NOT_BEFORE_THE_REQUEST, \
        sorted(loaded & NOT_BEFORE_THE_REQUEST)
    if args[0] == "stop":  # the reply is read by json's C scanner: no json, re nor enum at all
        assert "stopped" in result.stdout and wait_for(lambda: not instance_procs(inst.name), timeout=30)
        heavy = set(after.split()) & NOT_BEFORE_THE_REQUEST
        assert not heavy, sorted(heavy)
    else:
        assert inst.name in result.stdout


@pytest.mark.parametrize("argv", [["stop"], ["stop", "--name", "a"], ["stop", "--name=a", "--timeout", "5"],
                                  ["stop", "-c", "f.toml"], ["status", "--json"],
                                  ["status", "--name", "a", "--json"],
                                  ["start", "jobs.py:work", "-n", "4", "--name", "a", "-d"],
                                  ["start", "-c", "f.toml", "-d", "--log-file", "/tmp/a.log"],
                                  ["start", "m:f", "--workers=2", "--graceful-timeout", "5",
                                   "--log-level", "debug", "--metrics", "127.0.0.1:9100"]])
def test_the_forms_scripts_run_are_plain(argv):
    assert cli.plain_arguments(argv) is not None


PLAIN_WORDS = ["--name", "--name=a", "a", "b.c", "--timeout", "--timeout=2", "2.5", "-1", "nan", "1_0",
               " 3", "--json", "--json=1", "-c", "--config", "--config=f.toml", "-cf.toml", "-c=f",
               "--", "-h", "--help", "--nam", "--time", "", "=", "--name=", "-n", "x y"]
START_WORDS = ["m.py:f", "-n", "--workers", "--workers=3", "4", "-d", "--daemon", "--daemon=1", "-dn",
               "--log-file", "--log-file=/x", "--graceful-timeout", "--graceful-timeout=inf",
               "--log-level", "--log-level=warning", "info", "Debug", "bogus", "--metrics", ":9100",
               "--metrics=", "-n3"]


@settings(max_examples=900, deadline=None)
@given(st.sampled_from(["start", "stop", "status"]), st.lists(st.sampled_from(PLAIN_WORDS + START_WORDS),
                                                             max_size=6))
def test_plain_forms_read_as_argparse_reads_them(command, words):
    """cli.plain_arguments reads the plain forms of start, stop and status without argparse:
    where it answers, argparse gives the same arguments; anything argparse refuses or answers
    with help goes to argparse."""
    from tprocess.arguments import parse

    plain = cli.plain_arguments([command, *words])
    try:
        expected = vars(parse([command, *words]))
    except (cli.UserError, SystemExit):  # a mistake, or --help
        assert plain is None
        return
    if plain is not None:  # repr: a --timeout of nan is read alike, though nan != nan
        assert {k: repr(v) for k, v in vars(plain).items()} == {k: repr(v) for k, v in expected.items()}


def test_plain_start_reads_the_common_forms_fully():
    """The plain reader answers for start's usual command lines, with argparse's values."""
    args = cli.plain_arguments(["start", "m:f", "-n", "3", "--log-level", "warning", "-d"])
    assert args is not None
    assert (args.task, args.workers, args.log_level, args.daemon, args.name, args.config_file) == \
        ("m:f", 3, "WARNING", True, None, None)
    assert cli.plain_arguments(["start", "m:f", "other:g"]) is None  # two positionals: argparse's error
    assert cli.plain_arguments(["start", "m:f", "--log-level", "loud"]) is None


# inspect's own imports (dataclasses imports inspect, which stands in sys.modules until used)
NOT_IN_THE_WORKERS = ("threading", "logging", "setproctitle", "typing", "ast", "dis", "tokenize", "traceback",
                      "argparse", "gettext", "socket", "sysconfig", "ctypes", "tprocess.roll",
                      "tprocess.commands")


def test_workers_inherit_no_threading_or_logging_from_the_master(inst):
    """A worker is a fork of the master: what the master imported is in every worker. The
    standard logging (through setproctitle's package too) brings threading, whose at-fork
    handler makes each new worker copy ~90 more of the master's pages (bench/child_cost.py);
    inspect (with ast, dis, tokenize) is ~1.3 MiB of the master and ~9 ms of `start`;
    argparse with gettext ~0.4 MiB, socket.py's enums ~0.2, sysconfig ~0.26 (a plain
    `start` reads its arguments without argparse), ctypes's Python layer ~0.2 (prctl and
    malloc_trim are called through its C core: libc.py); the first workers are forked before the
    master imports the code of stop, status, reload and scale. A task that uses inspect
    still gets the real one."""
    seen = inst.dir / "modules.txt"
    inst.write("jobs.py", "import sys\n"
               "def work(ctx, retries=3):\n"
               f"    loaded = [m for m in {NOT_IN_THE_WORKERS!r} if m in sys.modules]\n"
               "    import inspect\n"
               "    loaded.append(str(inspect.signature(work)))\n"
               f"    open({str(seen)!r}, 'w').write(' '.join(loaded))\n"
               "    ctx.sleep(60)\n")
    inst.start("jobs.py:work", "-n", "1")
    assert wait_for(lambda: seen.exists() and seen.read_text(), timeout=30) == "(ctx, retries=3)"


def test_status_of_a_running_instance_reads_memory_from_proc_without_psutil(inst):
    """`status --json` of 500 workers: psutil's import and objects cost about 30 ms (bench/ops.py)."""
    inst.write("jobs.py", "def work(ctx):\n    ctx.sleep(1)\n")
    inst.start("jobs.py:work", "-n", "2")
    code = ("import sys\nfrom tprocess.cli import run\n"
            f"run(['status', '--json', '--name', {inst.name!r}])\n"
            "print(' '.join(sorted(sys.modules)), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "psutil" not in result.stderr.split()
    reply = json.loads(result.stdout)
    page = os.sysconf("SC_PAGE_SIZE")
    for proc in [reply["master"], *reply["workers"]]:
        with open(f"/proc/{proc['pid']}/statm") as fh:
            resident = int(fh.read().split()[1]) * page
        assert 1 << 20 < proc["rss"] and abs(proc["rss"] - resident) < 4 << 20, (proc, resident)


# --- reload and scale ------------------------------------------------------------------------


def test_reload_and_scale_of_an_instance_that_is_not_running(inst):
    for args in (["reload"], ["scale", "ip", "+2"], ["scale", "0"]):
        result = tp(inst, *args)
        assert_one_error_line(result, f"tprocess {inst.name!r} is not running", code=1)
    assert not instance_procs(inst.name)


def test_scale_sends_the_count_as_given_and_prints_the_change(inst):
    name = inst.name
    grown = {"ok": True, "group": "ip", "before": 5, "workers": 7,
             "started": [{"name": f"{name}-ip-5", "pid": 1005}, {"name": f"{name}-ip-6", "pid": 1006}],
             "stopped": []}
    shrunk = {"ok": True, "group": "", "before": 3, "workers": 2, "started": [],
              "stopped": [{"name": f"{name}-2", "pid": 2002}]}
    with fake_master(name, grown, shrunk) as master:
        first = tp(inst, "scale", "ip", "+2")
        second = tp(inst, "scale", "-1")
    assert master.requests == [{"cmd": "scale", "group": "ip", "count": "+2"},
                               {"cmd": "scale", "group": None, "count": "-1"}]
    assert first.returncode == 0 and first.stderr == "", first
    assert first.stdout.splitlines() == [f"scaled {name} group ip: 5 -> 7 workers",
                                         f"started {name}-ip-5 (pid 1005)", f"started {name}-ip-6 (pid 1006)"]
    assert second.returncode == 0 and second.stdout.splitlines() == [
        f"scaled {name}: 3 -> 2 workers", f"stopped {name}-2 (pid 2002)"]


def test_reload_waits_for_the_roll_and_prints_each_replaced_worker(inst):
    name = inst.name
    reply = {"ok": True, "generation": 2,
             "replaced": [{"name": f"{name}-ip-0", "old_pid": 11, "new_pid": 21},
                          {"name": f"{name}-ip-1", "old_pid": 12, "new_pid": 22}],
             "started": [{"name": f"{name}-new-0", "pid": 31}],
             "stopped": [{"name": f"{name}-old-0", "pid": 13}]}
    with fake_master(name, reply) as master:
        result = tp(inst, "reload")
    assert master.requests == [{"cmd": "reload"}]
    assert result.returncode == 0 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"reloaded {name}: generation 2, 2 workers replaced"), lines
    assert lines[1:] == [f"{name}-ip-0 (pid 11 -> 21)", f"{name}-ip-1 (pid 12 -> 22)",
                         f"started {name}-new-0 (pid 31)", f"stopped {name}-old-0 (pid 13)"]


@pytest.mark.parametrize("reply,code,needle", [
    ({"error": "tprocess.toml: groups.ip: workers: expected 1 to 4096, got 0", "code": 2}, 2, "groups.ip"),
    ({"error": "a reload is already running", "code": 1}, 1, "already running"),
    ({"error": "two\nlines", "code": 2}, 2, "two\\nlines"),  # a config error: one line
    (None, 1, "did not answer"),
])
def test_error_replies_give_one_line_and_their_exit_code(inst, reply, code, needle):
    with fake_master(inst.name, reply, reply) as master:
        results = [tp(inst, "reload"), tp(inst, "scale", "ip", "4")]
    assert [r["cmd"] for r in master.requests] == ["reload", "scale"]
    for result in results:
        assert_one_error_line(result, needle, code=code)
        assert result.stdout == ""


# --- logs ----------------------------------------------------------------------------------------

NUMBERED = '''
def work(ctx):
    if not getattr(ctx, "done", False):
        ctx.done = True
        for i in range(40):
            ctx.log.info("numbered line %d", i)
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_logs_prints_the_last_lines_of_a_started_daemons_log(inst):
    env = {"XDG_STATE_HOME": str(inst.dir / "state")}  # the default log file, inside the test's folder
    inst.write("jobs.py", NUMBERED)
    started = inst.run("start", "jobs.py:work", "-d", env=env)
    assert started.returncode == 0, started
    log = inst.dir / "state" / "tprocess" / f"{inst.name}.log"
    wait_for(lambda: "numbered line 39" in log.read_text(), 20, what="the task's 40 lines")

    last5 = tp(inst, "logs", "-n", "5", env=env)
    assert last5.returncode == 0 and last5.stderr == "", last5
    assert last5.stdout.splitlines() == log.read_text().splitlines()[-5:]
    assert "numbered line 39" in last5.stdout
    default = tp(inst, "logs", env=env)
    assert default.stdout.splitlines() == log.read_text().splitlines()[-20:]
    assert tp(inst, "logs", "-n", "0", env=env).stdout == ""
    assert inst.stop().returncode == 0


class LineReader:
    """Collects a child's stdout lines in a thread, so the test can wait for them with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        for line in proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, line: str, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while line not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line {line!r} within {timeout}s; seen {self.seen}")
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue
        return self.seen


def append(path: Path, *lines: str) -> None:
    with open(path, "a") as fh:
        fh.write("".join(line + "\n" for line in lines))


@pytest.mark.timeout(60)
def test_logs_follow_reads_across_a_rotation_and_ends_on_ctrl_c(inst):
    log = inst.dir / "app.log"
    config = inst.write("tprocess.toml", f'name = "{inst.name}"\nlog_file = "{log}"\n'
                                         '[groups.a]\ntask = "jobs.py:work"\n')
    append(log, "first", "second", "third")
    proc = subprocess.Popen([TPROCESS, "logs", "-c", str(config), "-n", "2", "-f"], cwd=inst.dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reader = LineReader(proc)
        assert reader.wait_for("third") == ["second", "third"]
        append(log, "fourth")
        reader.wait_for("fourth")

        # a rotation seen all at once: the follower is frozen while the file is renamed away,
        # written to once more (by a writer that still holds it), and replaced by a new file
        os.kill(proc.pid, signal.SIGSTOP)
        os.rename(log, inst.dir / "app.log.1")
        append(inst.dir / "app.log.1", "last of the old file")
        append(log, "first of the new file")
        os.kill(proc.pid, signal.SIGCONT)
        seen = reader.wait_for("first of the new file")
        assert seen[-2:] == ["last of the old file", "first of the new file"], seen
        append(log, "fifth")
        append(inst.dir / "app.log.1", "written to the old file after the switch")
        assert reader.wait_for("fifth")[-1] == "fifth"

        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 0
        stderr = proc.stderr.read()
        assert stderr == "", stderr
        assert "written to the old file after the switch" not in reader.seen
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_logs_without_a_log_file_is_one_line(inst):
    env = {"XDG_STATE_HOME": str(inst.dir / "state")}
    expected = inst.dir / "state" / "tprocess" / f"{inst.name}.log"
    for args in ([], ["-f"], ["-n", "3"]):
        result = tp(inst, "logs", *args, env=env)
        assert_one_error_line(result, f"no log file for {inst.name!r}", f"(looked at {expected})", code=1)


def test_logs_uses_the_log_file_the_running_master_reports(inst):
    reported = inst.dir / "elsewhere.log"
    append(reported, "from the reported file")
    with fake_master(inst.name, {"name": inst.name, "log_file": str(reported)},
                     {"name": inst.name, "log_file": None}):
        named = tp(inst, "logs")
        to_stderr = tp(inst, "logs")
    assert named.returncode == 0 and named.stdout == "from the reported file\n", named
    assert_one_error_line(to_stderr, "logs to stderr", code=1)


def test_tail_reads_only_the_end_of_a_big_log(tmp_path):
    path = tmp_path / "big.log"
    line = b"x" * 99 + b"\n"
    path.write_bytes(line * 100_000 + b"the end\n")  # 10 MB

    class Counting:
        def __init__(self, fh):
            self.fh, self.read_bytes = fh, 0

        def seek(self, *args):
            return self.fh.seek(*args)

        def read(self, size=-1):
            data = self.fh.read(size)
            self.read_bytes += len(data)
            return data

    with logtail.open_log(str(path)) as raw:
        counting = Counting(raw)
        assert logtail.last_lines(counting, 3) == line * 2 + b"the end\n"
        assert counting.read_bytes <= 2 * logtail.CHUNK
        assert raw.tell() == path.stat().st_size  # following goes on from the end
        assert logtail.last_lines(counting, 0) == b""
    small = tmp_path / "small.log"
    small.write_bytes(b"a\nb\nno newline at the end")
    with logtail.open_log(str(small)) as raw:
        assert logtail.last_lines(raw, 2) == b"b\nno newline at the end"
        assert logtail.last_lines(raw, 10) == b"a\nb\nno newline at the end"
    (tmp_path / "empty.log").write_bytes(b"")
    with logtail.open_log(str(tmp_path / "empty.log")) as raw:
        assert logtail.last_lines(raw, 5) == b""
