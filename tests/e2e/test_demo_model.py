"""The real demo model (SmolLM2-135M-Instruct, GGUF) through the daemon, on CPU.

Greedy output through the daemon must equal what transformers ``generate`` gives
directly in this process for the same prompt and params, token for token, in the
dtype the engine runs (bf16 on a CPU with native bf16, else fp32). The reference
here is computed independently of the engine's code: one prompt at a time, no
padding, the library's own chat template path. The daemon gets the prompts one at
a time too: in bf16 a row's output depends on what else is in its batch, in plain
transformers as well (see tests/unit/engines/test_hf_engine.py, where batches are compared
with transformers' batched generate).

The daemon here runs the engine's exact mode (``exact=true``: stock kernels), the one
held to equality; the default path is held to the field's bar (docs/quality.md,
tests/unit/engines/test_hf_quality.py) and served by the other e2e modules' daemons.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exgen.client import errors
from exgen.daemon import cpu_layout, modelstore
from exgen.daemon.cpu_layout import cpu_flags, native_bf16
from tests.conftest import RunningDaemon, start_daemon

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def demo_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """The demo daemon of tests/e2e/conftest.py in the engine's exact mode."""
    daemon = start_daemon(tmp_path_factory.mktemp("demo-daemon"), "--engine-opt", "exact=true")
    try:
        daemon.wait_ready(timeout=300)
        yield daemon
    finally:
        assert daemon.stop(timeout=60) == 0

PLAIN = [
    "The three primary colours are",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
CHAT = [
    [{"role": "user", "content": "Name a fruit that is yellow."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]
MAX_NEW = 24


def engine_dtype() -> str:
    """The dtype the transformers engine picks on this CPU (dtype=auto)."""
    return "bfloat16" if native_bf16(cpu_flags()) else "float32"


@pytest.fixture(scope="module")
def reference() -> Any:
    """Model and tokenizer loaded the plain Hugging Face way, for direct generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = modelstore.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # Loaded in that dtype (a .to() afterwards would also round the rotary frequencies).
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, engine_dtype())
    )
    model.eval()
    return model, tokenizer


def direct_generate(reference: Any, prompt: str | list[dict[str, str]], max_new: int) -> str:
    import torch

    model, tokenizer = reference
    if isinstance(prompt, str):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        input_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))


def test_greedy_output_equals_direct_transformers_generation(demo_daemon, reference):
    items: list[dict[str, Any]] = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PLAIN)]
    items += [{"id": f"c{i}", "messages": m} for i, m in enumerate(CHAT)]
    results = {}
    with demo_daemon.client(timeout=120) as client:
        for item in items:  # one at a time: each is a batch of one, as the reference
            (result,) = client.generate([item], max_new_tokens=MAX_NEW)
            results[item["id"]] = result
    assert sorted(results) == sorted(i["id"] for i in items)
    for item in items:
        prompt = item.get("prompt", item.get("messages"))
        expected = direct_generate(reference, prompt, MAX_NEW)
        got = results[item["id"]]
        assert got.ok, got.error
        assert got.text == expected, f"{item['id']}: daemon {got.text!r} != direct {expected!r}"
        assert 0 < got.completion_tokens <= MAX_NEW


def test_stream_arrives_in_chunks_while_the_batch_runs(demo_daemon):
    prompt = "Once upon a time, in a small village by the sea,"
    with demo_daemon.client(timeout=120) as client:
        (whole,) = client.generate([prompt], max_new_tokens=40)
        assert whole.ok and whole.completion_tokens == 40, whole
        started = time.monotonic()
        arrivals: list[tuple[float, str]] = []
        for chunk in client.stream(prompt, max_new_tokens=40):
            arrivals.append((time.monotonic() - started, chunk))
    total = arrivals[-1][0]
    chunks = [text for _, text in arrivals if text]
    assert "".join(chunks) == whole.text
    assert len(chunks) >= 10, chunks
    assert arrivals[0][0] < total / 3, arrivals


def test_capital_of_france_is_paris(demo_daemon):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with demo_daemon.client(timeout=120) as client:
        (result,) = client.generate([{"messages": question}], max_new_tokens=20)
    assert result.ok, result.error
    assert "Paris" in result.text
    assert result.finish_reason == "stop"


def test_prompt_longer_than_context_fails_alone(demo_daemon):
    status = demo_daemon.status()
    context = status["workers"][0]["max_seq_len"]
    assert context, status
    huge = "word " * (context + 100)
    items = [
        {"id": "ok1", "prompt": "Hello, my name is"},
        {"id": "huge", "prompt": huge},
        {"id": "ok2", "prompt": "The weather today is"},
    ]
    with demo_daemon.client(timeout=120) as client:
        results = {r.id: r for r in client.iter_results(items, max_new_tokens=8)}
    assert isinstance(results["huge"].error, errors.PromptTooLong)
    assert str(context) in str(results["huge"].error)
    assert results["ok1"].ok and results["ok2"].ok
    assert results["ok1"].text and results["ok2"].text


def test_status_shows_load_time(demo_daemon):
    workers = demo_daemon.status()["workers"]
    assert all(w["state"] == "ready" and w["load_s"] > 0 for w in workers)


def test_cpu_default_is_a_single_threaded_worker_per_core(demo_daemon):
    """`exgen serve` with no options on a machine without GPUs (bench/RESULTS.md, CPU
    worker layout): one worker per core (up to 8; the demo model fits many times)."""
    cores = cpu_layout.usable_cores()
    workers = demo_daemon.status()["workers"]
    assert len(workers) == min(cores, cpu_layout.MAX_DEFAULT_CPU_WORKERS)
    for worker in workers:
        env = dict(
            entry.split("=", 1)
            for entry in Path(f"/proc/{worker['pid']}/environ").read_text().split("\0")
            if "=" in entry
        )
        if "OMP_NUM_THREADS" not in os.environ:
            assert env["OMP_NUM_THREADS"] == str(max(1, cores // len(workers)))
