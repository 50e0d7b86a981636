"""A worker is `idle` in its slot before it tells the master it is ready, and the ready
report goes whole on the master's ready pipe.

Otherwise, between the ready message and its first task, `status` shows a worker the
master already counts as ready as `starting`: bench/ops.py saw a rolling reload of 100
workers "drop" to 99 past setup, while the process table never had fewer than 100.
"""

from __future__ import annotations

import os

from tprocess import worker
from tprocess.slots import STARTING, WORDS_PER_SLOT, Slot


class Report:
    """Stands for the report socket, which only a failing setup uses."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.sent.append(message)


def test_the_ready_report_goes_whole_on_the_ready_pipe_after_the_slot_left_starting(monkeypatch):
    slot = Slot(memoryview(bytearray(8 * WORDS_PER_SLOT)).cast("Q"), 0)
    slot.state = STARTING

    def task(ctx):
        raise SystemExit(0)

    read_end, write_end = os.pipe()
    states_at_report: list[int] = []
    real_write = os.write

    def noting_write(fd: int, data: bytes) -> int:
        if fd == write_end:
            states_at_report.append(slot.state)
        return real_write(fd, data)

    monkeypatch.setattr(worker.os, "write", noting_write)
    report = Report()
    spec = worker.WorkerSpec(title="t-0", group="", index=0, task=task, setup=lambda ctx: None,
                             teardown=None, slot=slot, report=report, master_pid=0,  # type: ignore[arg-type]
                             ready_fd=write_end)
    ctx = worker.Context("t-0", "", 0, slot, wake_fd=-1)
    try:
        assert worker._serve(spec, ctx) == worker.EXIT_OK
        os.close(write_end)
        assert os.read(read_end, 100) == b"R %d\n" % ctx.pid
        assert len(states_at_report) == 1 and states_at_report[0] != STARTING
        assert report.sent == []  # nothing on the report socket
    finally:
        os.close(read_end)
