"""Installs the peers into bench/.work/venv (idempotent) and re-runs the harness with that venv.

tprocess itself is installed there too (editable, without its own pins), so every contestant runs on
the same interpreter with the same redis-py, hiredis and uvloop.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VENV = os.path.join(ROOT, "bench", ".work", "venv")
PYTHON = os.path.join(VENV, "bin", "python")

# The newest versions that install together: arq 0.28 wants redis < 6, rq 3 wants redis >= 6.
PEERS = [
    "celery[redis]==5.7.0",
    "rq==3.0.0",
    "dramatiq[redis]==2.2.1",
    "huey==3.5.4",
    "arq==0.25.0",
    "redis==7.4.1",
    "hiredis==3.5.0",
    "uvloop==0.23.0",
    "psutil>=5.9,<8",
    "setproctitle>=1.3,<2",
    "rich>=13,<16",
]


def ensure_venv(log) -> None:
    marker = os.path.join(VENV, ".queue-peers")
    want = "\n".join(PEERS)
    if os.path.exists(marker) and open(marker).read() == want:
        return
    log("installing the peers into bench/.work/venv (once)")
    if not os.path.exists(PYTHON):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", *PEERS], check=True)
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT], check=True)
    with open(marker, "w") as f:
        f.write(want)


def reexec_in_venv(log) -> None:
    """Make sure the peers are installed; continue only in the bench venv's Python."""
    if os.path.realpath(os.path.dirname(sys.executable)) == os.path.realpath(os.path.dirname(PYTHON)):
        return
    try:
        ensure_venv(log)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"run.py: error: installing the peers failed: {exc}")
    os.execv(PYTHON, [PYTHON, *sys.argv])


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "tprocess",
        "celery",
        "kombu",
        "rq",
        "dramatiq",
        "huey",
        "arq",
        "redis",
        "hiredis",
        "uvloop",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out
