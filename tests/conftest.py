from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import Instance  # noqa: E402

pytest_plugins = ["queue_fixtures"]  # redis_server, broker_url


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak variant: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Instance]:
    """A fresh instance name and folder; every process it left is killed by pid."""
    instance = Instance(f"t{uuid.uuid4().hex[:10]}", tmp_path)
    try:
        yield instance
    finally:
        instance.cleanup()
