"""The five contestants.  Each knows how to start a pool of N workers running the
workload, find the pool's master pid, issue a stop, and force-clean a pool.

Every pool gets its own scratch dir (configs, sockets, logs, records file)."""

import json
import os
import signal
import subprocess
import sys
import time

import procutil as pu
import setup_env as se
from fork_cost import VARIANTS as HELD

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
WORKLOAD = os.path.join(BENCH, "workload.py")
FLOOR = os.path.join(BENCH, "floor.py")
PY = sys.executable  # the project venv python: runs the floor and the peers' workers
TPROCESS = os.path.join(os.path.dirname(sys.executable), "tprocess")
RUN_TAG = os.urandom(2).hex()  # keeps pool names unique across harness runs
GRACE_S = 10  # peers' graceful-stop timeout before SIGKILL (all set explicitly)


class Unavailable(Exception):
    pass


class Pool:
    def __init__(self, contestant, n, mode, dirpath, reaper):
        self.c, self.n, self.mode, self.dir, self.reaper = contestant, n, mode, dirpath, reaper
        os.makedirs(dirpath, exist_ok=True)
        self.records_path = os.path.join(dirpath, "records")
        open(self.records_path, "wb").close()
        self.records = pu.Records(self.records_path)
        self.name = f"bench-{RUN_TAG}-{os.path.basename(dirpath)}"
        self.env = dict(os.environ, BENCH_RECORDS=self.records_path, BENCH_MODE=mode,
                        PYTHONDONTWRITEBYTECODE="1", **contestant.env_extra)
        self.launcher = None
        self.master = None
        self.master_start = None
        self.known = {}  # pid -> starttime of every pool process seen
        self.closed = False

    def popen(self, cmd, **kw):
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", open(os.path.join(self.dir, "cmd.err"), "ab"))
        return self.reaper.popen(cmd, env=self.env, cwd=REPO, stdin=subprocess.DEVNULL,
                                 start_new_session=True, **kw)

    def set_master(self, pid):
        st = pu.read_stat(pid)
        if st is None:
            return False
        self.master, self.master_start = pid, st[3]
        self.known[pid] = st[3]
        return True

    def master_alive(self):
        st = pu.read_stat(self.master) if self.master else None
        return bool(st) and st[3] == self.master_start and st[0] != "Z"

    def snapshot(self, procs=None):
        """Remember master + descendants (pid, starttime); returns the live set."""
        if not self.master_alive():
            return set()
        pids = {self.master} | pu.descendants(self.master, procs)
        for p in pids:
            st = pu.read_stat(p)
            if st and st[0] != "Z":
                self.known.setdefault(p, st[3])
        return {p for p in pids if pu.alive(p)}

    def workers(self, procs=None):
        procs = procs if procs is not None else pu.all_procs()
        return [p for p, s in pu.children(self.master, procs).items() if s != "Z"]

    def err_tail(self):
        try:
            with open(os.path.join(self.dir, "cmd.err"), errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            return lines[-1][:160] if lines else ""
        except OSError:
            return ""


def _wait_file_pid(path, timeout):
    def get():
        try:
            pid = int(open(path).read().strip())
            return pid if pu.alive(pid) else None
        except (OSError, ValueError):
            return None
    return pu.wait_until(get, timeout, 0.005)


class Contestant:
    name = "?"
    how = ""
    available = True
    env_extra: dict = {}  # noqa: RUF012 - read only
    reason = ""
    foreground = False  # the start command is the master itself (does not return)
    cli_cmd = None  # a control-CLI call that touches no daemon: times the CLI's own startup
    version = ""

    def setup(self, log):
        pass

    def start(self, pool):
        raise NotImplementedError

    def find_master(self, pool, timeout):
        raise NotImplementedError

    def ensure_master(self, pool):
        """Look for the master if a start was interrupted before it was found."""
        if pool.master is None and pool.launcher is not None:
            try:
                self.find_master(pool, 3)
            except Exception:  # noqa: BLE001
                pass

    def stop(self, pool):
        """Issue the stop; return a Popen for a stop command, or None."""
        raise NotImplementedError

    def force_cleanup(self, pool):
        """SIGKILL whatever is left of the pool: master first, then every pid seen."""
        self.ensure_master(pool)
        if pool.master:
            pool.snapshot()
            if pu.kill_verified(pool.master, pool.master_start):
                # once it is dead its children are reparented to the harness (subreaper)
                pu.wait_until(lambda: not pool.master_alive(), 5, 0.005)
        for pid, st in list(pool.known.items()):
            pu.kill_verified(pid, st)
        # workers forked after the snapshot were reparented to the harness (subreaper):
        # every child of the harness that is not one of its own commands is such an orphan
        me = os.getpid()
        for _ in range(3):
            for pid, (state, ppid) in pu.all_procs().items():
                if ppid == me and state != "Z" and pid not in pool.reaper.popens:
                    st = pu.read_stat(pid)
                    if st:
                        pu.kill_verified(pid, st[3])
            time.sleep(0.05)
        pool.records.poll()
        for pid in list(pool.records.first_s):
            s = pu.read_stat(pid)
            if s and s[0] != "Z" and (pid in pool.known or "workload.py" in pu.cmdline(pid)
                                      or pu.cmdline(pid).startswith(pool.name + "-")):
                pu.kill_verified(pid, s[3])
        for p in (pool.launcher, getattr(pool, "stopper", None)):
            if p is not None and p.poll() is None:
                p.kill()


class Floor(Contestant):
    name = "floor"
    foreground = True
    how = "bench/floor.py (os.fork master, ~40 lines); stop = SIGTERM to master"

    def setup(self, log):
        self.version = f"python {sys.version.split()[0]}"

    def start(self, pool):
        pool.launcher = pool.popen([PY, FLOOR, f"{WORKLOAD}:task", str(pool.n)])

    def find_master(self, pool, timeout):
        return pool.set_master(pool.launcher.pid)

    def stop(self, pool):
        pu.kill_verified(pool.master, pool.master_start, signal.SIGTERM)
        return None


class TProcess(Contestant):
    name = "tprocess"
    how = "tprocess start bench/workload.py:task -n N -d; tprocess stop --name"

    def setup(self, log):
        if not os.path.exists(TPROCESS):
            raise Unavailable("console script not found")
        self.compile_sources(os.path.join(REPO, "src"))
        p = pu.run([TPROCESS, "--help"], capture_output=True, text=True, timeout=30)
        if p.returncode != 0 or "start" not in p.stdout:
            msg = (p.stderr or p.stdout).strip().splitlines()
            raise Unavailable(f"`tprocess --help` failed: {msg[-1][:100] if msg else p.returncode}")
        try:
            from importlib.metadata import version
            self.version = version("tprocess")
        except Exception:  # noqa: BLE001
            self.version = "?"
        p = pu.run([TPROCESS, "--version"], capture_output=True, text=True, timeout=30)
        if p.returncode == 0 and p.stdout.strip():
            self.version = p.stdout.strip().splitlines()[0].split()[-1]
        self.cli_cmd = [TPROCESS, "--version"]

    @staticmethod
    def compile_sources(src):
        """Bytecode caches written as `pip install` writes them: otherwise (this machine sets
        PYTHONDONTWRITEBYTECODE=1) every start would compile each module changed since the last
        `make test`, or all of them for a base tree (~35 ms)."""
        p = pu.run([sys.executable, "-m", "compileall", "-q", os.path.join(src, "tprocess")],
                   capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise Unavailable(f"compileall {src} failed: {(p.stderr or p.stdout).strip()[-100:]}")

    def start(self, pool):
        pool.launcher = pool.popen([TPROCESS, "start", "bench/workload.py:task", "-n", str(pool.n),
                                    "--name", pool.name, "-d",
                                    "--log-file", os.path.join(pool.dir, "t.log")])

    def find_master(self, pool, timeout):
        title = f"{pool.name}-master"

        def by_title():
            found = pu.find_by_cmdline(title)
            return found[0] if len(found) == 1 else None
        pid = pu.wait_until(by_title, timeout, 0.02)
        if not pid:  # fall back to the status command
            try:
                out = pu.run([TPROCESS, "status", "--name", pool.name, "--json"],
                                     capture_output=True, text=True, timeout=20).stdout
                d = json.loads(out)
                pid = d.get("master_pid") or d.get("pid") or (d.get("master") or {}).get("pid")
            except Exception:  # noqa: BLE001
                pid = None
        return bool(pid) and pool.set_master(int(pid))

    def stop(self, pool):
        return pool.popen([TPROCESS, "stop", "--name", pool.name])


class Supervisord(Contestant):
    name = "supervisord"
    how = "supervisord -c conf (numprocs=N, daemon); stop = supervisorctl shutdown"

    def setup(self, log):
        err = se.ensure_venv(log)
        if err:
            raise Unavailable(err)
        p = pu.run([os.path.join(se.VBIN, "supervisord"), "--version"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise Unavailable("supervisord --version failed")
        self.version = p.stdout.strip()
        self.cli_cmd = [os.path.join(se.VBIN, "supervisorctl"), "-h"]

    def _conf(self, pool):
        d = pool.dir
        env = f'BENCH_RECORDS="{pool.records_path}",BENCH_MODE="{pool.mode}"'
        conf = f"""[supervisord]
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid
childlogdir={d}
loglevel=warn
nodaemon=false
minfds=4096
minprocs=200

[unix_http_server]
file={d}/s.sock

[supervisorctl]
serverurl=unix://{d}/s.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:w]
command={PY} {WORKLOAD}
process_name=%(program_name)s_%(process_num)d
numprocs={pool.n}
directory={REPO}
autostart=true
autorestart=true
startsecs=1
stopsignal=TERM
stopwaitsecs={GRACE_S}
stdout_logfile=NONE
stderr_logfile=NONE
environment={env}
"""
        path = os.path.join(d, "supervisord.conf")
        with open(path, "w") as f:
            f.write(conf)
        return path

    def start(self, pool):
        pool.conf = self._conf(pool)
        pool.launcher = pool.popen([os.path.join(se.VBIN, "supervisord"), "-c", pool.conf])

    def find_master(self, pool, timeout):
        pid = _wait_file_pid(os.path.join(pool.dir, "supervisord.pid"), timeout)
        return bool(pid) and pool.set_master(pid)

    def stop(self, pool):
        return pool.popen([os.path.join(se.VBIN, "supervisorctl"), "-c", pool.conf, "shutdown"])


class Circus(Contestant):
    name = "circus"
    how = "circusd --daemon conf (numprocesses=N); stop = circusctl quit"

    def setup(self, log):
        err = se.ensure_venv(log)
        if err:
            raise Unavailable(err)
        p = pu.run([os.path.join(se.VBIN, "circusd"), "--version"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise Unavailable("circusd --version failed: " + (p.stderr.strip()[-100:]))
        self.version = p.stdout.strip().splitlines()[-1].split()[-1]
        self.cli_cmd = [os.path.join(se.VBIN, "circusctl"), "--version"]

    def start(self, pool):
        d = pool.dir
        pool.endpoint = f"ipc://{d}/endpoint"
        conf = f"""[circus]
endpoint = {pool.endpoint}
pubsub_endpoint = ipc://{d}/pubsub
stats_endpoint = ipc://{d}/stats
statsd = False
pidfile = {d}/circus.pid
logoutput = {d}/circus.log
loglevel = WARNING

[watcher:w]
cmd = {PY} {WORKLOAD}
working_dir = {REPO}
numprocesses = {pool.n}
copy_env = False
respawn = True
stop_signal = TERM
graceful_timeout = {GRACE_S}
warmup_delay = 0

[env:w]
BENCH_RECORDS = {pool.records_path}
BENCH_MODE = {pool.mode}
"""
        pool.conf = os.path.join(d, "circus.ini")
        with open(pool.conf, "w") as f:
            f.write(conf)
        pool.launcher = pool.popen([os.path.join(se.VBIN, "circusd"), "--daemon", pool.conf])

    def find_master(self, pool, timeout):
        pid = _wait_file_pid(os.path.join(pool.dir, "circus.pid"), timeout)
        return bool(pid) and pool.set_master(pid)

    def stop(self, pool):
        return pool.popen([os.path.join(se.VBIN, "circusctl"), "--endpoint", pool.endpoint,
                           "--timeout", "60", "quit"])


class PM2(Contestant):
    name = "pm2"
    how = "pm2 start eco.json (fork mode, instances=N, python interpreter); stop = pm2 kill"

    def setup(self, log):
        err = se.ensure_pm2(log)
        if err:
            raise Unavailable(err)
        pkg = os.path.join(se.NPM_PREFIX, "node_modules", "pm2", "package.json")
        node = pu.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        self.version = f"{json.load(open(pkg))['version']} (node {node})"

    def _env(self, pool):
        pool.env["PM2_HOME"] = os.path.join(pool.dir, "pm2")
        pool.env["PM2_KILL_SIGNAL"] = "SIGTERM"

    def start(self, pool):
        self._env(pool)
        eco = {"apps": [{
            "name": "w", "script": WORKLOAD, "interpreter": PY, "exec_mode": "fork",
            "instances": pool.n, "cwd": REPO, "autorestart": True, "kill_timeout": GRACE_S * 1000,
            # never /dev/null here: PM2 deletes its pid files (and would delete /dev/null)
            "out_file": os.path.join(pool.dir, "out.log"),
            "error_file": os.path.join(pool.dir, "err.log"),
            "pid_file": os.path.join(pool.dir, "w.pid"),
            "env": {"BENCH_RECORDS": pool.records_path, "BENCH_MODE": pool.mode},
        }]}
        path = os.path.join(pool.dir, "eco.json")
        with open(path, "w") as f:
            json.dump(eco, f)
        pool.launcher = pool.popen([se.PM2_BIN, "start", path])

    def find_master(self, pool, timeout):
        pid = _wait_file_pid(os.path.join(pool.dir, "pm2", "pm2.pid"), timeout)
        return bool(pid) and pool.set_master(pid)

    def stop(self, pool):
        return pool.popen([se.PM2_BIN, "kill"])

    def force_cleanup(self, pool):
        self.ensure_master(pool)
        if pool.master_alive():
            try:
                p = pool.popen([se.PM2_BIN, "kill"])
                pu.wait_until(lambda: p.poll() is not None, 30, 0.05)
            except Exception:  # noqa: BLE001
                pass
        super().force_cleanup(pool)


class TProcessBase(TProcess):
    """Another tree of tprocess's sources (BENCH_BASE_SRC, e.g. an export of an older
    commit), run side by side with the current one: before/after figures of a change."""
    name = "base"
    how = "tprocess as above, from the sources in $BENCH_BASE_SRC (PYTHONPATH)"

    def setup(self, log):
        src = os.environ.get("BENCH_BASE_SRC", "")
        if not os.path.isdir(os.path.join(src, "tprocess")):
            raise Unavailable("BENCH_BASE_SRC is not a folder holding tprocess/")
        super().setup(log)
        self.compile_sources(src)
        self.env_extra = {"PYTHONPATH": src}
        self.version = f"{self.version} from {src}"


class FloorHolding(Floor):
    """The floor whose master first imports what tprocess's master holds when it forks
    (issue 8): the part of tprocess's distance to the floor that holding that code costs
    every fork and exit, told apart from what tprocess does."""
    name = "floor+imports"
    how = ("bench/floor.py, its master importing tprocess's master modules (as "
           "bench/fork_cost.py's `master`), then gc.collect, malloc_trim, gc.freeze")

    def setup(self, log):
        super().setup(log)
        self.env_extra = {"BENCH_FLOOR_HOLD": ",".join(HELD["master"])}


ALL = [Floor, FloorHolding, TProcess, TProcessBase, Supervisord, Circus, PM2]
OPT_IN = ("base", "floor+imports")  # run only when --only names them
