"""A worker is `idle` in its slot before it tells the master it is ready.

Otherwise, between the ready message and its first task, `status` shows a worker the
master already counts as ready as `starting`: bench/ops.py saw a rolling reload of 100
workers "drop" to 99 past setup, while the process table never had fewer than 100.
"""

from __future__ import annotations

import os

from tprocess import worker
from tprocess.slots import STARTING, WORDS_PER_SLOT, Slot


class Report:
    """Stands for the report socket: notes the slot's state when the ready message goes out."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.states: list[int] = []

    def send(self, message: bytes) -> None:
        self.states.append(self.slot.state)


def test_the_slot_leaves_starting_before_the_ready_message(tmp_path):
    slot = Slot(memoryview(bytearray(8 * WORDS_PER_SLOT)).cast("Q"), 0)
    slot.state = STARTING

    def task(ctx):
        raise SystemExit(0)

    report = Report(slot)
    spec = worker.WorkerSpec(title="t-0", group="", index=0, task=task, setup=lambda ctx: None,
                             teardown=None, slot=slot, report=report, master_pid=0)  # type: ignore[arg-type]
    ctx = worker.Context("t-0", "", 0, slot, wake_fd=-1)
    assert worker._serve(spec, ctx) == worker.EXIT_OK
    assert len(report.states) == 1 and report.states[0] != STARTING


def test_the_ready_report_goes_whole_on_the_ready_pipe():
    slot = Slot(memoryview(bytearray(8 * WORDS_PER_SLOT)).cast("Q"), 0)
    slot.state = STARTING

    def task(ctx):
        raise SystemExit(0)

    read_end, write_end = os.pipe()
    report = Report(slot)  # a setup that succeeds sends nothing on the report socket
    spec = worker.WorkerSpec(title="t-0", group="", index=0, task=task, setup=lambda ctx: None,
                             teardown=None, slot=slot, report=report, master_pid=0,  # type: ignore[arg-type]
                             ready_fd=write_end)
    ctx = worker.Context("t-0", "", 0, slot, wake_fd=-1)
    try:
        assert worker._serve(spec, ctx) == worker.EXIT_OK
        os.close(write_end)
        assert os.read(read_end, 100) == b"R %d\n" % ctx.pid
        assert report.states == []  # not on the report socket
    finally:
        os.close(read_end)
