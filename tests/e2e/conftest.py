"""The e2e tests' daemon: `exgen serve` with no options (the demo model, the CPU
default), one per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RunningDaemon, start_daemon


@pytest.fixture(scope="module")
def demo_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("demo-daemon"))
    try:
        daemon.wait_ready(timeout=300)
        yield daemon
    finally:
        assert daemon.stop(timeout=60) == 0
