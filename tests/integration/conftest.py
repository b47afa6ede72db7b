"""Fixtures of the HTTP tests: one `exgen serve --http` per test module (synthetic,
zero-cost, two workers) and an openai SDK client for it."""

from __future__ import annotations

from collections.abc import Iterator

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
