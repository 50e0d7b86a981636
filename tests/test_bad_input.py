"""Bad input, tried as a hostile or careless user would.

Every input mistake must give: exit 2, exactly one `tprocess: error:` line on
stderr naming the file, key or value, no traceback, nothing left running, and a
running pool of the same name untouched. Tasks that misbehave at run time
(exit codes, SystemExit, KeyboardInterrupt, children of their own, SIGTERM
ignored) must not break the promises either. The config parser is fuzzed with
hypothesis.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from pathlib import Path

import pytest
from chaos_support import alive, assert_one_error_line, log_has_no_traceback, start, status_json
from helpers import instance_procs, wait_for
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tprocess.checks import is_name
from tprocess.config import (
    GROUP_KEYS,
    MAX_WORKERS,
    TOP_KEYS,
    Config,
    ConfigError,
    from_mapping,
    validate,
)

# what a valid instance name is (checks.is_name reads it without `re`)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*")

JOBS = '''
def work(ctx):
    ctx.sleep(3600)


notcall = 5


def two(a, b):
    pass
'''

GROUP = '[groups.a]\ntask = "jobs.py:work"\n'

# Files every case may refer to; written into the instance's folder.
FILES = {
    "jobs.py": JOBS,
    "syn.py": "def work(ctx:\n    pass\n",
    "raiser.py": 'raise RuntimeError("boom at import")\n',
    "exits.py": "import sys\nsys.exit(3)\n",
    "dep.py": "import nomod_abc_xyz\n\ndef work(ctx):\n    pass\n",
    "multiline.py": 'raise ValueError("first line\\nsecond line")\n',
}


def toml(text: str) -> dict[str, str]:
    return {"tprocess.toml": text}


NO_DEFAULT_LOG = "<the config file names the log file>"

# (id, extra files, arguments after `start`, what the error line must name)
CFG = ["-c", "tprocess.toml"]
START_CASES = [
    # wrong types
    ("cfg-name-int", toml("name = 5\n" + GROUP), CFG, ["tprocess.toml", "name", "5"]),
    ("cfg-workers-string", toml(GROUP + 'workers = "5"\n'), CFG, ["groups.a", "workers", "'5'"]),
    ("cfg-timeout-string", toml('graceful_timeout = "soon"\n' + GROUP), CFG,
     ["graceful_timeout", "'soon'"]),
    ("cfg-task-int", toml("[groups.a]\ntask = 5\n"), CFG, ["groups.a", "task", "5"]),
    ("cfg-task-missing", toml("[groups.a]\nworkers = 2\n"), CFG, ["groups.a", "'task'"]),
    ("cfg-log-file-int", toml("log_file = 5\n" + GROUP), CFG, ["log_file", "5"]),
    ("cfg-groups-int", toml("groups = 5\n"), CFG, ["groups", "5"]),
    ("cfg-group-not-table", toml("[groups]\na = 5\n"), CFG, ["groups.a", "5"]),
    ("cfg-groups-array", toml('[[groups]]\ntask = "jobs.py:work"\n'), CFG, ["groups"]),
    ("cfg-max-failures-float", toml("max_failures = 1.5\n" + GROUP), CFG, ["max_failures", "1.5"]),
    ("cfg-min-uptime-bool", toml(GROUP + "min_uptime = true\n"), CFG, ["min_uptime", "True"]),
    ("cfg-setup-list", toml(GROUP + 'setup = ["jobs.py:work"]\n'), CFG, ["setup"]),
    # unknown keys
    ("cfg-unknown-top-key", toml("colour = 1\n" + GROUP), CFG, ["tprocess.toml", "'colour'"]),
    ("cfg-unknown-group-key", toml(GROUP + "wrkers = 3\n"), CFG, ["groups.a", "'wrkers'"]),
    # counts
    ("cfg-workers-negative", toml(GROUP + "workers = -1\n"), CFG, ["workers", "-1"]),
    ("cfg-workers-zero", toml(GROUP + "workers = 0\n"), CFG, ["workers", "0"]),
    ("cfg-workers-enormous", toml(GROUP + "workers = 9223372036854775807\n"), CFG,
     ["workers", "9223372036854775807"]),
    ("cfg-workers-sum", toml(GROUP + "workers = 4000\n[groups.b]\ntask = \"jobs.py:work\"\n"
                             "workers = 4000\n"), CFG, ["8000"]),
    ("cfg-timeout-negative", toml("graceful_timeout = -1\n" + GROUP), CFG, ["graceful_timeout", "-1"]),
    ("cfg-timeout-inf", toml("graceful_timeout = inf\n" + GROUP), CFG, ["graceful_timeout", "inf"]),
    ("cfg-timeout-nan", toml(GROUP + "graceful_timeout = nan\n"), CFG, ["graceful_timeout", "nan"]),
    ("cfg-backoff-zero", toml("backoff_max = 0\n" + GROUP), CFG, ["backoff_max", "0"]),
    # names
    ("cfg-name-space", toml('name = "a b"\n' + GROUP), CFG, ["name", "'a b'"]),
    ("cfg-name-newline", toml('name = "a\\nb"\n' + GROUP), CFG, ["name", "'a\\nb'"]),
    ("cfg-name-slash", toml('name = "a/b"\n' + GROUP), CFG, ["name", "'a/b'"]),
    ("cfg-name-200", toml(f'name = "{"n" * 200}"\n' + GROUP), CFG, ["name", "200"]),
    ("cfg-name-empty", toml('name = ""\n' + GROUP), CFG, ["name", "''"]),
    ("cfg-group-name-space", toml('[groups."a b"]\ntask = "jobs.py:work"\n'), CFG, ["'a b'"]),
    ("cfg-group-name-dash", toml('[groups.a-b]\ntask = "jobs.py:work"\n'), CFG, ["'a-b'"]),
    # TOML itself
    ("cfg-duplicate-group", toml(GROUP + GROUP), CFG, ["tprocess.toml", "'a'", "twice"]),
    ("cfg-duplicate-key", toml(GROUP + "workers = 1\nworkers = 2\n"), CFG, ["tprocess.toml", "TOML"]),
    ("cfg-invalid-toml", toml("name = \n"), CFG, ["tprocess.toml", "invalid TOML"]),
    ("cfg-no-groups", toml('name = "x"\n'), CFG, ["tprocess.toml", "no groups"]),
    ("cfg-empty-file", toml(""), CFG, ["tprocess.toml", "no groups"]),
    ("cfg-missing-file", {}, ["-c", "nope.toml"], ["nope.toml"]),
    ("cfg-directory", {"adir.toml/.keep": ""}, ["-c", "adir.toml"], ["adir.toml"]),
    ("cfg-not-utf8", {"tprocess.toml": b"name = \"\xff\xfe\"\n"}, CFG, ["tprocess.toml", "UTF-8"]),
    ("cfg-setup-missing", toml(GROUP + 'setup = "jobs.py:nope"\n'), CFG, ["setup", "nope"]),
    ("cfg-teardown-not-callable", toml(GROUP + 'teardown = "jobs.py:notcall"\n'), CFG,
     ["teardown", "notcall"]),
    # task references
    ("task-missing-file", {}, ["missing.py:work"], ["missing.py"]),
    ("task-missing-module", {}, ["nomod_qq_zz:work"], ["nomod_qq_zz"]),
    ("task-missing-dependency", {}, ["dep.py:work"], ["nomod_abc_xyz"]),
    ("task-syntax-error", {}, ["syn.py:work"], ["syn.py", "line 1"]),
    ("task-raises-at-import", {}, ["raiser.py:work"], ["raiser.py", "RuntimeError", "boom at import"]),
    ("task-exits-at-import", {}, ["exits.py:work"], ["exits.py", "SystemExit"]),
    ("task-not-callable", {}, ["jobs.py:notcall"], ["notcall", "not callable"]),
    ("task-wrong-signature", {}, ["jobs.py:two"], ["two", "(a, b)"]),
    ("task-missing-function", {}, ["jobs.py:nope"], ["jobs.py", "nope"]),
    ("task-no-function", {}, ["jobs.py"], ["'jobs.py'"]),
    ("task-empty-module", {}, [":work"], ["':work'"]),
    ("task-relative-module", {}, ["..up:work"], ["..up"]),
    ("task-directory", {"pkgdir.py/.keep": ""}, ["pkgdir.py:work"], ["pkgdir.py"]),
    ("task-null-bytes", {"nul.py": b"def work(ctx):\n    pass\n\x00\n"}, ["nul.py:work"], ["nul.py"]),
    ("task-and-config", toml(GROUP), ["jobs.py:work", "-c", "tprocess.toml"], ["either"]),
    ("no-task", {}, [], ["TASK"]),
    # worker counts and timeouts on the command line
    ("n-zero", {}, ["jobs.py:work", "-n", "0"], ["workers", "0"]),
    ("n-negative", {}, ["jobs.py:work", "-n", "-3"], ["workers", "-3"]),
    ("n-enormous", {}, ["jobs.py:work", "-n", "99999999999999999999"], ["99999999999999999999"]),
    ("n-not-a-number", {}, ["jobs.py:work", "-n", "five"], ["'five'"]),
    ("n-with-config", toml(GROUP), ["-c", "tprocess.toml", "-n", "2"], ["-n/--workers"]),
    ("graceful-timeout-negative", {}, ["jobs.py:work", "--graceful-timeout", "-1"],
     ["graceful_timeout", "-1"]),
    ("graceful-timeout-inf", {}, ["jobs.py:work", "--graceful-timeout", "inf"],
     ["graceful_timeout", "inf"]),
    ("graceful-timeout-word", {}, ["jobs.py:work", "--graceful-timeout", "soon"], ["'soon'"]),
    ("unknown-option", {}, ["jobs.py:work", "--colour"], ["--colour"]),
    # log files that cannot be opened (as root, only a path under a file or in /proc fails)
    ("log-under-a-file", {"plain": "x"}, ["jobs.py:work", "--log-file", "{dir}/plain/x.log"],
     ["{dir}/plain"]),
    ("log-missing-folder", {}, ["jobs.py:work", "--log-file", "{dir}/no/such/x.log"], ["{dir}/no/such"]),
    ("log-in-proc", {}, ["jobs.py:work", "--log-file", "/proc/x.log"], ["/proc/x.log"]),
    ("log-is-a-directory", {}, ["jobs.py:work", "--log-file", "{dir}"], ["{dir}"]),
    ("cfg-log-under-a-file", {"plain": "x", "tprocess.toml": 'log_file = "plain/x.log"\n' + GROUP},
     CFG + [NO_DEFAULT_LOG], ["plain/x.log"]),
]

BAD_NAMES = [("space", "a b"), ("newline", "a\nb"), ("slash", "a/b"), ("long", "n" * 200),
             ("tab", "a\tb"), ("dash-start", "-x"), ("double-dash", "a--b"), ("del", "a\x7fb")]
NAME_CASES = [pytest.param("start", n, id=f"start-{i}") for i, n in BAD_NAMES] + [
    pytest.param(command, n, id=f"{command}-{i}")
    for command in ("stop", "status") for i, n in BAD_NAMES[:3]
]


def _write_files(inst, files: dict[str, str | bytes]) -> None:
    for name, content in {**FILES, **files}.items():
        path = inst.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _start_bad(inst, args: list[str], name: str | None = None):
    """start -d with a log file in the test's folder, unless the case names its own."""
    args = [a.replace("{dir}", str(inst.dir)) for a in args]
    extra = [] if "--log-file" in args or NO_DEFAULT_LOG in args else ["--log-file", str(inst.log)]
    args = [a for a in args if a != NO_DEFAULT_LOG]
    named = ["--name", name] if name is not None else []
    return inst.run("start", *args, "-d", *extra, *named, timeout=30)


def _nothing_left(inst) -> None:
    assert not instance_procs(inst.name), instance_procs(inst.name)


@pytest.mark.parametrize("files,args,needles",
                         [pytest.param(f, a, n, id=i) for i, f, a, n in START_CASES])
def test_bad_start_gives_one_clear_line(inst, files, args, needles):
    _write_files(inst, files)
    result = _start_bad(inst, args)
    assert_one_error_line(result, *[n.replace("{dir}", str(inst.dir)) for n in needles])
    assert result.stdout == ""
    _nothing_left(inst)


@pytest.mark.parametrize("command,name", NAME_CASES)
def test_bad_name_gives_one_clear_line(inst, command, name):
    _write_files(inst, {})
    if command == "start":
        result = _start_bad(inst, ["jobs.py:work"], name=name)
    else:
        result = inst.run(command, "--name", name)
    assert_one_error_line(result, "name", repr(name)[:20])
    assert not instance_procs(name) and not instance_procs(inst.name)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.from_regex(NAME_RE, fullmatch=True), st.text(alphabet="aZ09_.-\n é/", max_size=12),
                 st.text()))
@example("a-b.c_d")
@example("a--b")
@example("a-")
@example("a\n")
@example("")
def test_names_are_read_as_the_pattern_says(text):
    """checks.is_name (no `re`: it is on the path of every stop) accepts exactly the pattern's names."""
    assert is_name(text) == bool(NAME_RE.fullmatch(text))


def test_empty_name_is_an_error_not_the_default_instance(inst):
    # status only: it never signals, so a real default instance is safe
    assert_one_error_line(inst.run("status", "--name", ""), "--name", "''")


# Inputs that broke the one-line rule before 4f802f4: kept as regression tests.
@pytest.mark.parametrize("files,args,needles", [
    pytest.param(toml('[groups."a\\nb"]\ntask = "jobs.py:work"\n'), CFG, ["tprocess.toml", "a\\nb"],
                 id="group-name-with-newline"),
    pytest.param(toml(f"graceful_timeout = 1{'0' * 400}\n" + GROUP), CFG, ["graceful_timeout"],
                 id="timeout-int-beyond-float"),
    pytest.param({}, ["multiline.py:work"], ["multiline.py", "ValueError", "first line"],
                 id="import-error-message-on-two-lines"),
    pytest.param(toml('log_file = "x\\u0000.log"\n' + GROUP), CFG, ["log_file"], id="log-file-with-nul"),
])
def test_bad_start_once_buggy(inst, files, args, needles):
    _write_files(inst, files)
    result = _start_bad(inst, args)
    assert_one_error_line(result, *needles)
    _nothing_left(inst)


def test_status_and_stop_of_an_instance_that_never_existed(inst):
    status = inst.run("status")
    assert status.returncode == 3 and "not running" in status.stdout and status.stderr == ""
    as_json = inst.run("status", "--json")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["master"] is None
    stop = inst.stop("--timeout", "5")
    assert stop.returncode == 0 and "not running" in stop.stdout and stop.stderr == "", stop
    # without --name, the name comes from the file
    assert_one_error_line(inst.run("status", "-c", "nope.toml", name=False), "nope.toml")
    assert_one_error_line(inst.run("stop", "-c", "nope.toml", name=False), "nope.toml")


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "-inf"])
def test_bad_stop_timeout(inst, value):
    assert_one_error_line(inst.stop("--timeout", value), "--timeout", value.strip("-"))


def _snapshot(inst) -> tuple[int, dict[str, int]]:
    master = inst.master().pid
    return master, {t: p.pid for t, p in inst.wait_workers(2).items()}


@pytest.mark.timeout(120)
def test_bad_input_leaves_a_running_pool_untouched(inst):
    _write_files(inst, {"plain": "x", "tprocess.toml": "colour = 1\n" + GROUP})
    inst.start("jobs.py:work", "-n", "2")
    before = _snapshot(inst)
    attempts = [
        _start_bad(inst, ["missing.py:work"]),
        _start_bad(inst, ["raiser.py:work"]),
        _start_bad(inst, ["jobs.py:notcall"]),
        _start_bad(inst, ["-c", "tprocess.toml"]),
        _start_bad(inst, ["-c", "nope.toml"]),
        _start_bad(inst, ["jobs.py:work", "-n", "0"]),
        _start_bad(inst, ["jobs.py:work", "--graceful-timeout", "-1"]),
        _start_bad(inst, ["jobs.py:work", "--log-file", "{dir}/plain/x.log"]),
        inst.stop("--timeout", "-1"),
        inst.stop("--timeout", "nan"),
        inst.stop("--timeout", "soon"),
        inst.run("status", "--json", "--bogus"),
    ]
    for result in attempts:
        assert_one_error_line(result)
    assert _snapshot(inst) == before
    assert status_json(inst)["master"]["state"] == "running"
    assert inst.stop().returncode == 0
    _nothing_left(inst)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["inf", "1e10"])
def test_stop_with_an_endless_timeout(inst, value):
    """An endless --timeout is refused (exit 2, pool untouched) or honoured (a clean
    stop of idle workers): never a crash of the master or a traceback."""
    _write_files(inst, {})
    inst.start("jobs.py:work", "-n", "2")
    before = _snapshot(inst)
    result = inst.stop("--timeout", value, timeout=30)
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 2:
        assert_one_error_line(result, "--timeout")
        assert _snapshot(inst) == before
        assert inst.stop().returncode == 0
    else:
        assert result.returncode == 0, (result.stdout, result.stderr)
        _nothing_left(inst)
    log_has_no_traceback(inst)


# --- tasks that misbehave at run time ---------------------------------------------------

SETUP_FAILS_THRICE = '''
import os

COUNTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "counts")


def setup(ctx):
    if ctx.index != 1:
        return
    path = os.path.join(COUNTS, str(ctx.index))
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as fh:
        fh.write(str(n + 1))
    if n < 3:
        raise RuntimeError(f"setup failure {n + 1}")


def work(ctx):
    ctx.sleep(3600)
'''


@pytest.mark.timeout(60)
def test_setup_that_raises_backs_off_then_runs(inst):
    (inst.dir / "counts").mkdir()
    inst.write("jobs.py", SETUP_FAILS_THRICE)
    inst.write("tprocess.toml", '[groups.db]\ntask = "jobs.py:work"\nsetup = "jobs.py:setup"\n'
                                "workers = 2\n")
    began = time.monotonic()
    inst.start("-c", "tprocess.toml")
    took = time.monotonic() - began
    log = inst.read_log()
    for n in (1, 2, 3):
        assert f"RuntimeError: setup failure {n}" in log
    title = f"{inst.name}-db-1"
    assert f"restarting {title} in 0.1s" in log and f"restarting {title} in 0.2s" in log, log
    assert took >= 0.3, f"start did not wait out the backoff: {took}"
    workers = {w["name"]: w for w in status_json(inst)["workers"]}
    assert workers[title]["restarts"] == 3 and workers[title]["pid"]
    assert workers[f"{inst.name}-db-0"]["restarts"] == 0
    assert inst.stop().returncode == 0
    _nothing_left(inst)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body,code", [
    ("import os\n\ndef work(ctx):\n    os._exit(3)\n", 3),
    ("def work(ctx):\n    raise SystemExit(5)\n", 5),
], ids=["os._exit(3)", "SystemExit(5)"])
def test_task_exit_code_is_a_failure(inst, body, code):
    inst.write("jobs.py", body + "\n\ndef fine(ctx):\n    ctx.sleep(3600)\n")
    inst.write("tprocess.toml", 'max_failures = 3\n[groups.bad]\ntask = "jobs.py:work"\n'
                                '[groups.ok]\ntask = "jobs.py:fine"\n')
    master = start(inst, "-c", "tprocess.toml")
    title = f"{inst.name}-bad-0"

    def failed():
        data = status_json(inst)
        bad = next(w for w in data["workers"] if w["name"] == title)
        return data if bad["state"] == "failed" else None

    data = wait_for(failed, 15, what=f"{title} to be marked failed")
    log = inst.read_log()
    assert log.count(f"exited with code {code}") == 3, log
    ok = next(w for w in data["workers"] if w["name"] == f"{inst.name}-ok-0")
    assert ok["restarts"] == 0 and ok["pid"]
    assert data["master"]["pid"] == master
    assert inst.stop().returncode == 0
    _nothing_left(inst)


@pytest.mark.timeout(60)
def test_task_raising_keyboard_interrupt_is_a_task_error(inst):
    """KeyboardInterrupt from a task is an error of that task, not a stop."""
    inst.write("jobs.py", "def work(ctx):\n    raise KeyboardInterrupt\n")
    inst.start("jobs.py:work", "-n", "1")
    (worker,) = inst.wait_workers(1).values()

    def errors():
        (w,) = status_json(inst)["workers"]
        return w if w["errors"] >= 3 else None

    w = wait_for(errors, 15, what="three task errors")
    assert w["pid"] == worker.pid and w["restarts"] == 0
    assert "KeyboardInterrupt" in inst.read_log()
    began = time.monotonic()
    assert inst.stop().returncode == 0
    assert time.monotonic() - began < 5
    _nothing_left(inst)


FORKER = '''
import os, signal, subprocess, time

PIDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "children.txt")


def _note(pid):
    fd = os.open(PIDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"%d\\n" % pid)
    os.close(fd)


def work(ctx):
    if getattr(ctx, "forked", False):
        ctx.sleep(3600)
        return
    ctx.forked = True
    # a plain fork that sleeps on (it keeps the worker's SIGTERM handler)
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(1000)
        finally:
            os._exit(0)
    _note(pid)
    # a program started the usual way
    _note(subprocess.Popen(["sleep", "1000"]).pid)
    # a shell and its child, both ignoring SIGTERM
    _note(subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 1000 & echo $! >> " + PIDS + "; wait"]).pid)
    # a daemon: double fork and a new session, so the worker is not its parent
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            _note(os.getpid())
            os.execvp("sleep", ["sleep", "1000"])
        os._exit(0)
    os.waitpid(pid, 0)
'''


@pytest.mark.timeout(60)
def test_children_of_tasks_do_not_survive_stop(inst):
    inst.write("jobs.py", FORKER)
    pids_file = inst.dir / "children.txt"
    inst.start("jobs.py:work", "-n", "2")

    def children():
        pids = [int(x) for x in pids_file.read_text().split()] if pids_file.exists() else []
        return pids if len(pids) == 10 and all(alive(p) for p in pids) else None

    pids = wait_for(children, 15, what="10 children of tasks")
    began = time.monotonic()
    stopped = inst.stop()
    took = time.monotonic() - began
    assert stopped.returncode == 0, (stopped.stdout, stopped.stderr)
    survivors = [p for p in pids if alive(p)]
    assert not survivors, f"children of tasks outlived stop: {survivors}"
    _nothing_left(inst)
    assert took < 10, took
    log_has_no_traceback(inst)


@pytest.mark.timeout(60)
def test_task_ignoring_sigterm_is_killed_at_the_timeout(inst):
    inst.write("jobs.py", "import signal, time\n\ndef work(ctx):\n"
                          "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(0.3)\n")
    inst.start("jobs.py:work", "-n", "2")
    workers = inst.wait_workers(2)
    began = time.monotonic()
    stopped = inst.stop("--timeout", "1")
    took = time.monotonic() - began
    assert stopped.returncode == 1, (stopped.stdout, stopped.stderr)
    for title, proc in workers.items():
        assert f"{title} (pid {proc.pid})" in stopped.stderr, stopped.stderr
        assert not alive(proc.pid)
    assert 1 <= took < 10, took
    _nothing_left(inst)


# --- the config parser under hypothesis ---------------------------------------------------

LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-3, max_value=MAX_WORKERS + 3),
    st.floats(),
    st.text(max_size=20),
    st.datetimes(),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)

# Valid by construction: the parser must accept every one of these.
good_names = st.from_regex(NAME_RE, fullmatch=True).filter(lambda n: len(n) <= 48)
good_seconds = st.one_of(st.integers(0, 10**5), st.floats(0, 10**5))
good_positive = st.one_of(st.integers(1, 10**5), st.floats(0.001, 10**5))
good_refs = st.sampled_from(["jobs.py:work", "jobs:work", "sub/jobs.py:Cls.method", "pkg.mod:f_1"])
good_group = st.fixed_dictionaries(
    {"task": good_refs},
    optional={"workers": st.integers(1, 1000), "setup": good_refs, "teardown": good_refs,
              "graceful_timeout": good_seconds, "min_uptime": good_seconds,
              "backoff_max": good_positive, "max_failures": st.integers(1, 10**6)},
)
good_configs = st.fixed_dictionaries(
    {"groups": st.dictionaries(st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True), good_group,
                               min_size=1, max_size=3)},
    optional={"name": good_names, "graceful_timeout": good_seconds, "min_uptime": good_seconds,
              "backoff_max": good_positive, "max_failures": st.integers(1, 10**6),
              "log_file": st.text(st.characters(exclude_characters="\0"), max_size=30),
              "metrics": st.one_of(st.integers(1, 65535), st.integers(1, 65535).map(str),
                                   st.integers(1, 65535).map(lambda p: f"localhost:{p}"))},
)


@st.composite
def mutated_configs(draw):
    """A valid config with a few keys replaced, added or removed at random."""
    data = draw(good_configs)
    for _ in range(draw(st.integers(1, 3))):
        groups = list(data["groups"].values()) if isinstance(data.get("groups"), dict) else []
        tables = [data, *[g for g in groups if isinstance(g, dict)]]
        target = draw(st.sampled_from(tables))
        keys = sorted(TOP_KEYS if target is data else GROUP_KEYS)
        key = draw(st.one_of(st.sampled_from(keys), st.text(max_size=10)))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(values)
    if draw(st.booleans()) and isinstance(data.get("groups"), dict):
        data["groups"][draw(st.text(max_size=12))] = draw(st.one_of(good_group, values))
    return data


configs = st.one_of(
    good_configs.map(lambda d: (d, True)),
    mutated_configs().map(lambda d: (d, False)),
    st.dictionaries(st.text(max_size=10), values, max_size=4).map(lambda d: (d, False)),
)


def _check(data: dict, base: Path, must_pass: bool = False) -> None:
    try:
        config = from_mapping(copy.deepcopy(data), source="x.toml", base_dir=base)
    except ConfigError as exc:
        message = str(exc)
        assert not must_pass, f"a valid config was refused: {message}"
        assert message.startswith("x.toml"), message
        assert len(message.splitlines()) == 1 and not any(c in message for c in LINE_BREAKS), message
        return
    assert isinstance(config, Config)
    assert validate(config) is config
    assert is_name(config.name) and NAME_RE.fullmatch(config.name) and len(config.name) <= 48
    assert config.groups and 1 <= config.total_workers() <= MAX_WORKERS
    assert len({g.name for g in config.groups}) == len(config.groups)
    for value in (config.graceful_timeout, config.min_uptime, config.backoff_max):
        assert math.isfinite(value) and value >= 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=configs)
@example(case=({"groups": {"a": {"task": "jobs.py:work", "workers": 2}}}, True))
@example(case=({"name": "x", "groups": {"a": {"task": "j.py:w", "workers": MAX_WORKERS + 1}}}, False))
def test_config_parser_accepts_valid_and_refuses_the_rest_in_one_line(case, tmp_path_factory):
    data, valid = case
    _check(data, tmp_path_factory.getbasetemp(), must_pass=valid)


@pytest.mark.parametrize("data", [
    pytest.param({"groups": {"a\nb": {"task": "j.py:w"}}}, id="group-name-newline"),
    pytest.param({"groups": {"a\u2028b": {"task": "j.py:w"}}}, id="group-name-line-separator"),
    pytest.param({"graceful_timeout": 10**400, "groups": {"a": {"task": "j.py:w"}}}, id="int-too-big"),
])
def test_config_parser_once_buggy_inputs(data, tmp_path):
    _check(data, tmp_path)


# --- a task's signature, read without inspect ---------------------------------------------

@st.composite
def plain_functions(draw):
    """A def with a random but valid parameter list, in Python's order."""
    positional = draw(st.lists(st.sampled_from(["p", "q=1"]), max_size=4))
    if any("=" in p for p in positional):  # no required positional after a default one
        first_default = next(i for i, p in enumerate(positional) if "=" in p)
        positional = positional[:first_default] + [f"{p}=1" if "=" not in p else p
                                                   for p in positional[first_default:]]
    names = [f"{p.split('=')[0]}{i}" + ("=1" if "=" in p else "") for i, p in enumerate(positional)]
    star = draw(st.sampled_from(["", "*args", "*"]))
    keywords = draw(st.lists(st.sampled_from(["k", "k=2"]), min_size=star == "*", max_size=2)) if star else []
    names += [star] if star else []
    names += [f"{k.split('=')[0]}{i}" + ("=2" if "=" in k else "") for i, k in enumerate(keywords)]
    if draw(st.booleans()):
        names.append("**kw")
    namespace: dict = {}
    exec(f"def f({', '.join(names)}): pass", namespace)  # noqa: S102 - a generated signature
    return namespace["f"]


@given(plain_functions(), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_a_plain_functions_arity_is_read_as_inspect_reads_it(func, count):
    """`start` checks that a task takes (ctx) or (ctx, job) from the code object, without
    importing inspect: it must never accept what inspect.signature(...).bind would refuse,
    and it accepts every plain function that needs no keyword-only argument."""
    import inspect

    from tprocess.loader import _plain_function_takes

    try:
        inspect.signature(func).bind(*[None] * count)
        binds = True
    except TypeError:
        binds = False
    says = _plain_function_takes(func, count)
    needs_keyword = any(p.kind is p.KEYWORD_ONLY and p.default is p.empty
                        for p in inspect.signature(func).parameters.values())
    assert says == (binds and not needs_keyword), (inspect.signature(func), count)
