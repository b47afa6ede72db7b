"""What the gateway refuses, and with which status: keys (401, SIGHUP reload), budgets
(413, 429 with Retry-After), deadlines (504), no worker (503), strict model names
(404), and listening beyond loopback without keys (refused at start)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import EXGEN
from tests.integration.http_support import (
    HttpDaemon,
    request,
    start_http_daemon,
)
from tests.netutil import free_port

KEY = "sk-exgen-first"
CHAT = [{"role": "user", "content": "hi"}]
LIMITS = {
    "EXGEN_HTTP_MAX_BODY_BYTES": "4000",
    "EXGEN_HTTP_MAX_FILE_BYTES": "3000",
    "EXGEN_HTTP_MAX_INFLIGHT": "1",
    "EXGEN_HTTP_REQUEST_TIMEOUT_S": "1.5",
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpDaemon, Path]]:
    """One slow slot (20 ms a token, one at a time), small budgets, and an API key."""
    tmp = tmp_path_factory.mktemp("guarded")
    keys = tmp / "keys.txt"
    keys.write_text(f"# the gateway's keys\n{KEY}\n\n")
    env = {**LIMITS, "EXGEN_HTTP_API_KEYS_FILE": str(keys)}
    daemon = start_http_daemon(
        tmp,
        "--engine", "synthetic", "--engine-opt", "token_ms=20", "--engine-opt", "capacity=1",
        env=env,
    )  # fmt: skip
    daemon.wait_healthy()
    yield daemon, keys
    assert daemon.stop() == 0


def chat(daemon: HttpDaemon, key: str | None = KEY, **body: Any) -> tuple[int, Any]:
    return daemon.post("/v1/chat/completions", {"model": "x", "messages": CHAT, **body}, key=key)


def test_keys_are_required_and_sighup_reloads_them(guarded: tuple[HttpDaemon, Path]) -> None:
    daemon, keys = guarded
    for key in (None, "sk-wrong"):
        status, body = chat(daemon, key=key, max_tokens=1)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert daemon.get("/v1/models")[0] == 401
    assert daemon.get("/health")[0] == 200  # probes need no key
    assert chat(daemon, max_tokens=1)[0] == 200
    sdk = openai.OpenAI(base_url=daemon.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    keys.write_text("sk-exgen-second\n")
    daemon.daemon.proc.send_signal(signal.SIGHUP)  # the supervisor hands it on
    deadline = time.monotonic() + 10
    while chat(daemon, max_tokens=1)[0] != 401 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chat(daemon, key="sk-exgen-second", max_tokens=1)[0] == 200
    assert chat(daemon, max_tokens=1)[0] == 401
    keys.write_text(f"{KEY}\n")
    daemon.daemon.proc.send_signal(signal.SIGHUP)
    while chat(daemon, max_tokens=1)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "API keys reloaded" in daemon.daemon.log_text()


def test_too_large_is_413(guarded: tuple[HttpDaemon, Path]) -> None:
    daemon, _ = guarded
    status, body = chat(daemon, max_tokens=1, user="x" * 5000)
    assert status == 413 and "http_max_body_bytes" in body["error"]["message"]
    sdk = openai.OpenAI(base_url=daemon.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.files.create(file=("big.jsonl", b"{}\n" * 2000), purpose="batch")
    assert caught.value.status_code == 413


def test_busy_is_429_with_retry_after_and_slow_is_504(guarded: tuple[HttpDaemon, Path]) -> None:
    daemon, _ = guarded
    answers: list[tuple[int, Any]] = []
    slow = threading.Thread(target=lambda: answers.append(chat(daemon, max_tokens=1000)))
    started = time.monotonic()
    slow.start()
    time.sleep(0.4)  # the slow one holds the only admission (http_max_inflight = 1)
    sdk = openai.OpenAI(base_url=daemon.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="x", messages=CHAT, max_tokens=1)
    assert caught.value.response.headers["retry-after"] == "1"
    slow.join(30)
    status, body = answers[0]
    assert status == 504 and "http_request_timeout_s" in body["error"]["message"]
    assert time.monotonic() - started < 10  # 1000 tokens would take 20 s
    # The deadline cancelled it where it ran: the slot answers the next one at once.
    begin = time.monotonic()
    assert chat(daemon, max_tokens=2)[0] == 200
    assert time.monotonic() - begin < 3


def test_no_worker_ready_is_503(http_daemon: Any) -> None:
    daemon = http_daemon("--engine", "synthetic", "--engine-opt", "boot_s=60")
    deadline = time.monotonic() + 30
    status: int | None = None
    while time.monotonic() < deadline:
        try:
            status, body = daemon.get("/health")
            break
        except OSError:
            time.sleep(0.1)
    assert status == 503 and "is ready yet" in body["error"]["message"]
    status, body = daemon.post("/v1/completions", {"model": "x", "prompt": "a", "max_tokens": 1})
    assert status == 503 and body["error"]["type"] == "server_error"
    daemon.daemon.proc.send_signal(signal.SIGINT)
    daemon.daemon.proc.send_signal(signal.SIGINT)  # a second signal: stop now
    daemon.daemon.proc.wait(30)


def test_beyond_loopback_needs_keys(tmp_path: Path) -> None:
    port = free_port()
    refused = subprocess.run(
        [*EXGEN, "serve", "--engine", "synthetic", "--listen", f"ipc://{tmp_path}/s.sock",
         "--http", f"0.0.0.0:{port}", "--http-state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "http_api_keys_file" in refused.stderr and "reachable from other" in refused.stderr


STRICT = {"EXGEN_STRICT_MODEL": "true"}


def wait_for_health(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if request(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not healthy in 30s")


def test_the_gateway_runs_alone_and_a_strict_routers_names_are_404(
    tmp_path: Path, daemon_factory: Any
) -> None:
    daemon = daemon_factory("--engine", "synthetic", "--engine-opt", "token_ms=0", env=STRICT)
    port = free_port()
    log = (tmp_path / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "exgen.daemon.gateway", "--router", daemon.address,
         "--listen", str(port), "--state-dir", str(tmp_path / "state")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url)
        body = {"messages": CHAT, "max_tokens": 2}
        status, reply = request(url + "/v1/chat/completions", {**body, "model": "gpt-4o"})
        assert status == 404 and reply["error"]["code"] == "model_not_found"
        assert "synthetic" in reply["error"]["message"] and reply["error"]["param"] == "model"
        assert request(url + "/v1/chat/completions", {**body, "model": "synthetic"})[0] == 200
    finally:
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(30) == 0
        log.close()


def test_exgen_serve_http_with_strict_model_answers_404_for_another_model(
    tmp_path: Path, http_daemon: Any
) -> None:
    """The router's strict_model, as an HTTP caller meets it: 404 for a whole answer, a
    stream and a completion naming another model; a batch line naming one is an
    error line; the served name, or none, is answered."""
    daemon = http_daemon("--engine", "synthetic", "--engine-opt", "token_ms=0", env=STRICT)
    daemon.wait_healthy()
    sdk = openai.OpenAI(base_url=daemon.base_url, api_key="x", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            reply = sdk.chat.completions.create(
                model="gpt-4o", messages=CHAT, max_tokens=2, stream=stream
            )
            list(reply) if stream else None  # type: ignore[call-overload]
        assert caught.value.code == "model_not_found", caught.value.body
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4o", prompt="a", max_tokens=2)
    served = sdk.chat.completions.create(model="synthetic", messages=CHAT, max_tokens=2)
    assert served.model == "synthetic" and served.choices[0].message.content
    status, unnamed = daemon.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
    assert status == 200, unnamed
    lines = tmp_path / "b.jsonl"
    lines.write_text(
        "\n".join(
            json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                        "body": {"messages": CHAT, "max_tokens": 2, "model": m}})
            for c, m in (("good", "synthetic"), ("bad", "llama"))
        )
    )  # fmt: skip
    with lines.open("rb") as f:
        file = sdk.files.create(file=f, purpose="batch")
    batch = sdk.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status != "completed":
        time.sleep(0.1)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    assert batch.error_file_id is not None
    errors = [json.loads(x) for x in sdk.files.content(batch.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("bad", 404)]
    assert errors[0]["response"]["body"]["error"]["code"] == "model_not_found"
    assert daemon.stop() == 0
