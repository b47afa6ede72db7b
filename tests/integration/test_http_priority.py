"""A chat request made during a big batch is answered about as fast as on an idle
daemon. The gateway sends both through ONE client of the router (so round-robin
between clients cannot be what saves it): batch lines at ``priority="batch"``,
which the router dispatches only when no interactive item waits. Submitted as
interactive, the same lines would put the chat request behind all of them (within
one client the longest max_new_tokens goes first): this test then fails."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.http_support import batch_lines

# One worker, 5 ms a token: a 20-token batch line takes 0.1 s, so the 4,000 lines
# queue for about 50 s; a 4-token chat request takes about 20 ms.
ENGINE = ("--engine", "synthetic", "--engine-opt", "token_ms=5", "--workers", "1")
# A chat request queued behind the batch would wait tens of seconds.
REQUEST_TIMEOUT_S = 10.0


def chat_latency(sdk: openai.OpenAI, samples: int) -> float:
    took = []
    for i in range(samples):
        started = time.perf_counter()
        try:
            sdk.chat.completions.create(
                model="x", messages=[{"role": "user", "content": f"quick {i}"}], max_tokens=4
            )
        except openai.APITimeoutError:
            pytest.fail(f"no answer in {REQUEST_TIMEOUT_S:g}s: queued behind the batch")
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def gateway_clients(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in status["clients"] if str(c.get("name", "")).startswith("exgen gateway")]


def test_a_chat_request_during_a_batch_is_not_queued_behind_it(
    tmp_path: Path, http_daemon: Any
) -> None:
    daemon = http_daemon(*ENGINE)
    daemon.wait_healthy()
    sdk = openai.OpenAI(
        base_url=daemon.base_url, api_key="x", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    idle = chat_latency(sdk, 10)
    path = tmp_path / "batch.jsonl"
    path.write_text(batch_lines(4000, max_tokens=20))
    with path.open("rb") as f:
        file = sdk.files.create(file=f, purpose="batch")
    batch = sdk.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while (sdk.batches.retrieve(batch.id).request_counts or batch).completed < 50:  # type: ignore[union-attr]
        time.sleep(0.1)
    busy = chat_latency(sdk, 10)
    [carrier] = gateway_clients(daemon.daemon.status())  # one client carries both kinds
    assert carrier["queued"] > 1000, carrier
    counts = sdk.batches.retrieve(batch.id).request_counts
    assert counts is not None and counts.completed < 3000, "the batch ended too soon to tell"
    # Beside the batch, a slot frees every ~12 ms and the request takes one (plus the
    # worker's small prefetch of batch lines already handed to it).
    assert busy < 4 * idle + 0.3, f"idle {idle * 1e3:.0f} ms, during the batch {busy * 1e3:.0f} ms"
    sdk.batches.cancel(batch.id)
    assert daemon.stop() == 0
