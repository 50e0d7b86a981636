"""The crawler's tasks: one call per job. `job.data` is the JSON the producer put."""

import asyncio
import json
import socket

from tprocess import Reject

PORTS = (80, 443)
CONNECT_TIMEOUT = 3.0


async def scan_ip(ctx, job):
    """Which of PORTS accept a connection on job.data["ip"]: I/O bound, so async, many at once."""
    ip = job.data.get("ip") if isinstance(job.data, dict) else None
    if not ip:
        raise Reject(f"job {job.id} has no ip: {job.data!r}")  # no retry: straight to the dead letters
    open_ports = [port for port, ok in zip(PORTS, await asyncio.gather(*(_accepts(ip, p) for p in PORTS)),
                                           strict=True) if ok]
    print(json.dumps({"ip": ip, "open": open_ports, "attempt": job.attempt}))  # lands in the log


async def _accepts(ip, port):
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), CONNECT_TIMEOUT)
    except OSError:  # TimeoutError is one too
        return False
    writer.close()
    return True


def scan_domain(ctx, job):
    """The addresses of job.data["domain"]; a resolver failure raises and is retried later."""
    domain = job.data.get("domain") if isinstance(job.data, dict) else None
    if not domain:
        raise Reject(f"job {job.id} has no domain: {job.data!r}")
    addresses = sorted({info[4][0] for info in socket.getaddrinfo(domain, None)})
    print(json.dumps({"domain": domain, "addresses": addresses}))
