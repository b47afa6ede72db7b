"""curl, as the docs show it (docs/http.md), against a real `exgen serve --http`."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.http_support import HttpDaemon, batch_lines

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(*args: str) -> str:
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_curl_chat_and_stream(gateway: HttpDaemon) -> None:
    body = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    url = f"{gateway.base_url}/chat/completions"
    reply = json.loads(curl(url, "-H", "Content-Type: application/json", "-d", json.dumps(body)))
    text = reply["choices"][0]["message"]["content"]
    streamed = curl("-N", url, "-H", "Content-Type: application/json",
                    "-d", json.dumps({**body, "stream": True}))  # fmt: skip
    events = [line.removeprefix("data: ") for line in streamed.splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_curl_batch_upload_create_poll_download(gateway: HttpDaemon, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(batch_lines(20, url="/v1/completions"))
    file = json.loads(curl(f"{gateway.base_url}/files", "-F", "purpose=batch",
                           "-F", f"file=@{prompts}"))  # fmt: skip
    assert file["object"] == "file" and file["bytes"] == prompts.stat().st_size
    batch = json.loads(
        curl(f"{gateway.base_url}/batches", "-H", "Content-Type: application/json", "-d",
             json.dumps({"input_file_id": file["id"], "endpoint": "/v1/completions",
                         "completion_window": "24h"}))
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while batch["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = json.loads(curl(f"{gateway.base_url}/batches/{batch['id']}"))
    assert batch["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    out = tmp_path / "out.jsonl"
    curl(f"{gateway.base_url}/files/{batch['output_file_id']}/content", "-o", str(out))
    ids = sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines())
    assert ids == sorted(f"req-{i}" for i in range(20))
