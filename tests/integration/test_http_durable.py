"""A batch outlives its processes: kill -9 of the whole daemon (supervisor, gateway,
workers) in the middle of a 20,000-line batch, then `exgen serve` again on the same
state directory: the batch completes, each custom_id exactly once, the counts right.
And the gateway alone dying is the keeper's business: restarted, the batch goes on."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Batch

from tests.integration.http_support import HttpDaemon, batch_lines

ZERO_COST = ("--engine", "synthetic", "--engine-opt", "token_ms=0", "--workers", "2")


def submit(sdk: openai.OpenAI, path: Path) -> str:
    with path.open("rb") as f:
        file = sdk.files.create(file=f, purpose="batch")
    batch = sdk.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def wait_for(sdk: openai.OpenAI, batch_id: str, done_at_least: int, timeout: float = 120) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = sdk.batches.retrieve(batch_id)
        counts = batch.request_counts
        done = counts.completed + counts.failed if counts else 0
        if batch.status == "completed" or done >= done_at_least:
            return batch
        time.sleep(0.02)
    raise AssertionError(f"{batch_id}: {done} done after {timeout}s")


def check_output(sdk: openai.OpenAI, batch_id: str, total: int) -> None:
    batch = wait_for(sdk, batch_id, total)
    assert batch.status == "completed"
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (
        total,
        total,
        0,
    )
    ids = [
        json.loads(line)["custom_id"]
        for line in sdk.files.content(batch.output_file_id).text.splitlines()
    ]
    assert len(ids) == total, "a custom_id appears twice, or one is missing"
    assert set(ids) == {f"req-{i}" for i in range(total)}


def sdk_for(daemon: HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url, api_key="x", max_retries=2)


@pytest.mark.slow
def test_kill_9_of_the_whole_daemon_mid_batch(tmp_path: Path, http_daemon: Any) -> None:
    total = 20_000
    state = tmp_path / "state"
    first = http_daemon(*ZERO_COST, state_dir=state)
    first.wait_healthy()
    inputs = tmp_path / "batch.jsonl"
    inputs.write_text(batch_lines(total))
    sdk = sdk_for(first)
    batch_id = submit(sdk, inputs)
    batch = wait_for(sdk, batch_id, 3000)
    done_before = batch.request_counts.completed  # type: ignore[union-attr]
    assert batch.status == "in_progress" and done_before < total - 3000, "killed too late"
    killed = first.kill_all()
    assert len(killed) == 4  # supervisor, gateway, two workers
    assert not any(p.is_running() for p in killed)

    second = http_daemon(*ZERO_COST, state_dir=state)
    second.wait_healthy()
    sdk = sdk_for(second)
    resumed = sdk.batches.retrieve(batch_id)
    assert resumed.request_counts is not None
    assert resumed.request_counts.completed >= done_before  # committed work was kept
    check_output(sdk, batch_id, total)
    assert "resuming 1 batches" in second.daemon.log_text()
    assert second.stop() == 0


def test_the_gateway_restarted_by_the_keeper_resumes_the_batch(
    tmp_path: Path, http_daemon: Any
) -> None:
    total = 3000
    daemon = http_daemon("--engine", "synthetic", "--engine-opt", "token_ms=1", "--workers", "2")
    daemon.wait_healthy()
    inputs = tmp_path / "batch.jsonl"
    inputs.write_text(batch_lines(total))
    sdk = sdk_for(daemon)
    batch_id = submit(sdk, inputs)
    wait_for(sdk, batch_id, 200)
    old = daemon.gateway_pid()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if daemon.gateway_pid() != old:
                break
        except AssertionError:
            pass
        time.sleep(0.1)
    daemon.wait_healthy()
    check_output(sdk, batch_id, total)
    log = daemon.daemon.log_text()
    assert "exit gateway" in log and "restart in" in log
    assert daemon.stop() == 0
