"""Fixtures of the HTTP tests: one `exgen serve --http` per test module (synthetic,
zero-cost, two workers), an openai SDK client for it, and a factory of daemons of
a test's own."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.http_support import SYNTHETIC, HttpDaemon, start_http_daemon


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpDaemon]:
    daemon = start_http_daemon(tmp_path_factory.mktemp("http"), *SYNTHETIC, "--workers", "2")
    daemon.wait_healthy()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture
def sdk(gateway: HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)


@pytest.fixture
def http_daemon(tmp_path: Path) -> Iterator[Callable[..., HttpDaemon]]:
    """Start `exgen serve --http` daemons for one test; whatever still runs at the end
    is stopped (a failed test must not leave processes to the next one)."""
    started: list[HttpDaemon] = []

    def start(*args: str, **kwargs: Any) -> HttpDaemon:
        daemon = start_http_daemon(tmp_path / f"daemon{len(started)}", *args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        proc = daemon.daemon.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
