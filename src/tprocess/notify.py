"""systemd's sd_notify protocol, spoken by the master when NOTIFY_SOCKET is set.

The protocol is one datagram of newline-separated `KEY=VALUE` lines sent to the
AF_UNIX socket named by NOTIFY_SOCKET (a path, or an abstract name written
"@name"). It is simple enough to write here: the maintained alternatives are a C
binding (python-systemd, needs libsystemd headers to build) or a blocking
socket that knows nothing of the watchdog variables (sdnotify).

Sending never blocks the master and never fails it: the socket is non-blocking
and a send error (systemd gone, its queue full) is ignored.

The master also keeps two timers here, both off unless systemd asked for them:
the watchdog ping (every half of WATCHDOG_USEC) and, while a graceful stop waits
for long tasks, the periodic EXTEND_TIMEOUT_USEC (systemd wants it resent within
the time it names).
"""

from __future__ import annotations

import _socket  # not socket.py: its enums are ~0.2 MiB of the master (issue 8)
import os
import time
from collections.abc import MutableMapping

from .logs import log

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
EXTEND_MARGIN = 5.0  # seconds beyond the slowest group's graceful timeout
EXTEND_EVERY = 10.0  # resend EXTEND_TIMEOUT_USEC this often while a stop waits
MAX_DATAGRAM = 4096  # a STATUS= line is for people: keep it short


class Notifier:
    """One non-blocking datagram socket to systemd, and the timers systemd asked for."""

    def __init__(self, address: str, watchdog_usec: int | None = None) -> None:
        self.address = socket_address(address)
        self.sock = _socket.socket(
            _socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC
        )
        self._watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec else None
        self.next_watchdog: float | None = None
        if self._watchdog_interval is not None:
            self.next_watchdog = time.monotonic() + self._watchdog_interval
        self.stop_deadline: float | None = None  # when the slowest stopping group gets SIGKILL
        self.next_extend: float | None = None

    @classmethod
    def from_environment(cls, enabled: bool = True,
                         environ: MutableMapping[str, str] | None = None) -> Notifier | None:
        """The notifier systemd asked for, or None; the variables are removed either way,
        so that workers, and the programs they exec, do not inherit them."""
        env = os.environ if environ is None else environ
        address, usec, watchdog_pid = (env.pop(name, None) for name in ENV_VARS)
        if not enabled or not address:
            return None
        if address[0] not in "/@":
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket path or @name: not notifying", address)
            return None
        watchdog_usec = _watchdog_usec(usec) if watchdog_pid in (None, str(os.getpid())) else None
        try:
            return cls(address, watchdog_usec)
        except OSError as exc:
            log.warning("cannot open a socket for NOTIFY_SOCKET: %s; not notifying", exc.strerror)
            return None

    # --- the messages -------------------------------------------------------------

    def send(self, *fields: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False if it could not be sent."""
        message = "\n".join(fields).encode(errors="replace")[:MAX_DATAGRAM]
        try:
            self.sock.sendto(message + b"\n", self.address)
        except OSError:
            return False  # systemd gone or busy: not the workers' problem
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", status_field(status))

    def reloading(self, status: str = "reloading") -> None:
        # Type=notify-reload requires the CLOCK_MONOTONIC time of the reload's start
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", status_field(status))

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", status_field(status))

    def status(self, text: str) -> None:
        self.send(status_field(text))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more from now: systemd needs another one before they pass."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")

    @property
    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC, in seconds: how often to ping; None if no watchdog."""
        return self._watchdog_interval

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # --- timers -------------------------------------------------------------------

    def begin_stop(self, deadline: float, status: str) -> None:
        """STOPPING=1, and enough time for the stop: until `deadline` (monotonic) + a margin."""
        self.stopping(status)
        self.stop_deadline = deadline
        self._extend(time.monotonic())

    def next_due(self) -> float | None:
        """The monotonic time of the next timer; None when none is on (the master may sleep)."""
        due = [t for t in (self.next_watchdog, self.next_extend) if t is not None]
        return min(due) if due else None

    def run_due(self, now: float) -> None:
        """Send what is due at `now` and schedule the next one."""
        if self.next_watchdog is not None and self.next_watchdog <= now:
            self.watchdog()
            self.next_watchdog = now + self._watchdog_interval  # type: ignore[operator]
        if self.next_extend is not None and self.next_extend <= now:
            self._extend(now)

    def _extend(self, now: float) -> None:
        """Each one covers the whole stop (until the deadline + a margin); while the stop is
        long, it is resent in case one was lost. None after the deadline: a master that
        does not finish then is for systemd to kill."""
        remaining = max(0.0, (self.stop_deadline or now) - now)
        self.extend_timeout(remaining + EXTEND_MARGIN)
        self.next_extend = now + EXTEND_EVERY if remaining > EXTEND_EVERY else None


def socket_address(address: str) -> str:
    """NOTIFY_SOCKET's address as Python's AF_UNIX takes it ("@name" is abstract)."""
    return "\0" + address[1:] if address.startswith("@") else address


def status_field(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line: a newline would start a new field


def _watchdog_usec(value: str | None) -> int | None:
    try:
        usec = int(value) if value else 0
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds: no watchdog", value)
        return None
    return usec if usec > 0 else None


class NullNotifier:
    """No systemd to tell: every message is dropped and no timer is ever due."""

    def ready(self, status: str) -> None:
        pass

    def reloading(self, status: str = "reloading") -> None:
        pass

    def stopping(self, status: str = "stopping") -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def begin_stop(self, deadline: float, status: str) -> None:
        pass

    def next_due(self) -> float | None:
        return None

    def run_due(self, now: float) -> None:
        pass

    def fileno(self) -> int:
        return -1
