"""The Batch API against a real `exgen serve --http`: the openai SDK end to end (files,
batches, polling, downloading), the lifecycle (validation errors, per-request errors,
cancel, expiry), and `exgen-client batch` over it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Batch, FileObject

from tests.conftest import EXGEN_CLIENT
from tests.integration.http_support import (
    HttpDaemon,
    batch_lines,
    request,
)

FINAL = ("completed", "failed", "expired", "cancelled")


def wait_final(sdk: openai.OpenAI, batch_id: str, timeout: float = 60) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")


def upload(sdk: openai.OpenAI, tmp_path: Path, text: str) -> FileObject:
    path = tmp_path / "input.jsonl"
    path.write_text(text)
    with path.open("rb") as f:
        return sdk.files.create(file=f, purpose="batch")


def create_batch(sdk: openai.OpenAI, tmp_path: Path, text: str, window: str = "24h") -> str:
    file = upload(sdk, tmp_path, text)
    return sdk.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    ).id


def slow_daemon(start: Any, token_ms: int) -> tuple[HttpDaemon, openai.OpenAI]:
    daemon = start(
        "--engine", "synthetic", "--engine-opt", f"token_ms={token_ms}", "--workers", "1"
    )
    daemon.wait_healthy()
    return daemon, openai.OpenAI(base_url=daemon.base_url, api_key="x", max_retries=0)


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_files_and_batches_end_to_end(sdk: openai.OpenAI, tmp_path: Path) -> None:
    text = batch_lines(300)
    file = upload(sdk, tmp_path, text)
    assert isinstance(file, FileObject) and file.bytes == len(text.encode())
    assert sdk.files.retrieve(file.id).filename == "input.jsonl"
    assert sdk.files.content(file.id).text == text
    batch = sdk.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "e2e"},
    )
    assert isinstance(batch, Batch) and batch.status in ("validating", "in_progress")
    done = wait_final(sdk, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (300, 300)
    assert done.request_counts.failed == 0 and done.error_file_id is None
    assert done.metadata == {"job": "e2e"} and done.model == "synthetic"
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output = records(sdk.files.content(done.output_file_id).text)
    assert sorted(r["custom_id"] for r in output) == sorted(f"req-{i}" for i in range(300))
    for record in output:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = openai.types.chat.ChatCompletion.model_validate(record["response"]["body"])
        assert body.model == "synthetic"  # honest: the file asked for "any"
        assert len(body.choices[0].message.content.split()) == 4
    assert sdk.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in sdk.batches.list(limit=100)]


def test_batch_list_pages_newest_first(sdk: openai.OpenAI, tmp_path: Path) -> None:
    file = upload(sdk, tmp_path, batch_lines(2))
    ids = [
        sdk.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    first = sdk.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    second = sdk.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    for batch_id in ids:
        wait_final(sdk, batch_id)


def test_a_file_breaking_the_rules_fails_with_errors_per_line(
    sdk: openai.OpenAI, tmp_path: Path
) -> None:
    good = batch_lines(3).splitlines()
    lines = [
        good[0],
        "this is not json",
        good[1],
        good[1],  # duplicate custom_id
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}}),
    ]
    done = wait_final(sdk, create_batch(sdk, tmp_path, "\n".join(lines) + "\n"))
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None and done.errors.data is not None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (4, "duplicate_custom_id"),
        (5, "mismatched_endpoint"),
    }
    assert done.output_file_id is None


def test_a_bad_request_body_fails_alone_in_the_error_file(
    sdk: openai.OpenAI, tmp_path: Path
) -> None:
    lines = batch_lines(4).splitlines()
    bad = json.loads(lines[2])
    bad["body"]["temperature"] = "hot"
    lines[2] = json.dumps(bad)
    done = wait_final(sdk, create_batch(sdk, tmp_path, "\n".join(lines) + "\n"))
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    errors = records(sdk.files.content(done.error_file_id).text)
    assert [e["custom_id"] for e in errors] == ["req-2"]
    assert errors[0]["response"]["status_code"] == 400  # as the same body over HTTP
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
    assert len(records(sdk.files.content(done.output_file_id).text)) == 3


def test_create_refuses_what_it_cannot_run(
    gateway: HttpDaemon, sdk: openai.OpenAI, tmp_path: Path
) -> None:
    file = upload(sdk, tmp_path, batch_lines(1))
    cases = [
        ({"input_file_id": "file-nope"}, 404, "input_file_id"),
        ({"endpoint": "/v1/embeddings"}, 400, "endpoint"),
        ({"completion_window": "soon"}, 400, "completion_window"),
        ({"metadata": {"k": 1}}, 400, "metadata"),
    ]
    for change, status, param in cases:
        body = {
            "input_file_id": file.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **change,
        }
        got, reply = gateway.post("/v1/batches", body)
        assert (got, reply["error"]["param"]) == (status, param), reply


def test_cancel_keeps_what_is_done_and_answers_the_rest(tmp_path: Path, http_daemon: Any) -> None:
    daemon, sdk = slow_daemon(http_daemon, token_ms=5)
    batch_id = create_batch(sdk, tmp_path, batch_lines(400, max_tokens=10))
    # A second batch of the same custom_ids, on the gateway's same client: cancelling
    # the first must not touch it.
    twin_id = create_batch(sdk, tmp_path, batch_lines(400, max_tokens=10))
    while (sdk.batches.retrieve(batch_id).request_counts or Batch).completed < 10:  # type: ignore[union-attr]
        time.sleep(0.05)
    cancelling = sdk.batches.cancel(batch_id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    done = wait_final(sdk, batch_id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert counts is not None and 10 <= counts.completed < 400
    assert counts.completed + counts.failed == 400
    output = records(sdk.files.content(done.output_file_id).text)
    errors = records(sdk.files.content(done.error_file_id).text)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    ids = [r["custom_id"] for r in output + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(400))
    twin = wait_final(sdk, twin_id)
    assert twin.status == "completed" and twin.request_counts is not None
    assert (twin.request_counts.completed, twin.request_counts.failed) == (400, 0)
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(wait_final(sdk, create_batch(sdk, tmp_path, batch_lines(1))).id)
    assert daemon.stop() == 0


def test_a_batch_past_its_window_expires(tmp_path: Path, http_daemon: Any) -> None:
    daemon, sdk = slow_daemon(http_daemon, token_ms=20)
    done = wait_final(sdk, create_batch(sdk, tmp_path, batch_lines(200, max_tokens=20), "2s"))
    assert done.status == "expired" and done.expired_at
    counts = done.request_counts
    assert counts is not None and counts.completed + counts.failed == 200
    errors = records(sdk.files.content(done.error_file_id).text)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert daemon.stop() == 0


def test_files_delete_and_its_guards(
    gateway: HttpDaemon, sdk: openai.OpenAI, tmp_path: Path
) -> None:
    file = upload(sdk, tmp_path, batch_lines(1))
    deleted = sdk.files.delete(file.id)
    assert deleted.deleted and deleted.id == file.id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(file.id)
    assert request(gateway.url + f"/v1/files/{file.id}/content")[0] == 404
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert caught.value.param == "purpose"


def test_exgen_client_batch_commands(gateway: HttpDaemon, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(batch_lines(50, url="/v1/completions"))
    out = tmp_path / "results.jsonl"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*EXGEN_CLIENT, "batch", *args, "--url", gateway.url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = cli("create", str(prompts), "--wait", "-o", str(out))
    assert created.returncode == 0, created.stderr
    batch_id = created.stdout.strip()
    assert batch_id.startswith("batch_")
    assert sorted(r["custom_id"] for r in records(out.read_text())) == sorted(
        f"req-{i}" for i in range(50)
    )
    status = cli("status", batch_id, "--json")
    assert json.loads(status.stdout)["request_counts"] == {
        "total": 50,
        "completed": 50,
        "failed": 0,
    }
    listed = cli("list")
    assert batch_id in listed.stdout and "completed" in listed.stdout
    again = tmp_path / "again.jsonl"
    downloaded = cli("download", batch_id, "-o", str(again))
    assert downloaded.returncode == 0 and again.read_bytes() == out.read_bytes()
    cancelled = cli("cancel", batch_id)
    assert cancelled.returncode == 1 and "Cannot cancel" in cancelled.stderr
    missing = subprocess.run(
        [*EXGEN_CLIENT, "batch", "list", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 3 and "no exgen HTTP gateway" in missing.stderr
