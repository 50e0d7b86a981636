"""Installs the peers into bench/.work (idempotent): a venv with supervisor, circus
and matplotlib from PyPI, and PM2 from the npm registry."""

import json
import os
import shutil
import sys

import procutil as pu

BENCH = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(BENCH, ".work")
VENV = os.path.join(WORK, "venv")
VBIN = os.path.join(VENV, "bin")
NPM_PREFIX = os.path.join(WORK, "npm")
PM2_BIN = os.path.join(NPM_PREFIX, "node_modules", ".bin", "pm2")

PIP_REQS = ["supervisor==4.3.0", "circus==0.19.0", "matplotlib==3.11.2"]
PM2_VERSION = "7.0.4"


def _run(cmd, timeout, log):
    p = pu.run(cmd, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"{os.path.basename(cmd[0])} exit {p.returncode}: {tail[0][:120]}")
    return p


def ensure_venv(log):
    """Returns None on success, else a reason string."""
    marker = os.path.join(VENV, ".bench-reqs")
    want = "\n".join(PIP_REQS)
    try:
        if os.path.exists(marker) and open(marker).read() == want:
            return None
        if not os.path.exists(os.path.join(VBIN, "python")):
            _run([sys.executable, "-m", "venv", VENV], 120, log)
        _run([os.path.join(VBIN, "python"), "-m", "pip", "install", "-q", *PIP_REQS], 600, log)
        with open(marker, "w") as f:
            f.write(want)
        return None
    except Exception as e:  # noqa: BLE001
        return f"pip install failed: {e}"


def ensure_pm2(log):
    pkg = os.path.join(NPM_PREFIX, "node_modules", "pm2", "package.json")
    try:
        if os.path.exists(pkg) and json.load(open(pkg)).get("version") == PM2_VERSION:
            return None
        npm = shutil.which("npm")
        if not npm:
            return "npm not found"
        os.makedirs(NPM_PREFIX, exist_ok=True)
        _run([npm, "install", "--prefix", NPM_PREFIX, f"pm2@{PM2_VERSION}", "--no-audit",
              "--no-fund", "--loglevel=error"], 600, log)
        return None
    except Exception as e:  # noqa: BLE001
        return f"npm install failed: {e}"


def pip_versions():
    """{dist: version} of what is in the bench venv."""
    try:
        out = pu.run([os.path.join(VBIN, "python"), "-m", "pip", "list", "--format=json"],
                             capture_output=True, text=True, timeout=60).stdout
        return {d["name"].lower(): d["version"] for d in json.loads(out)}
    except Exception:  # noqa: BLE001
        return {}
