"""The real demo model (SmolLM2-135M-Instruct, GGUF) through the daemon, on CPU.

Greedy output through the daemon must equal what transformers ``generate`` gives
directly in this process for the same prompt and params, token for token. The
reference here is computed independently of the engine's code: one prompt at a
time, no padding, the library's own chat template path.
"""

from __future__ import annotations

from typing import Any

import pytest

from exgen.client import errors
from exgen.daemon import modelstore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

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


@pytest.fixture(scope="module")
def reference() -> Any:
    """Model and tokenizer loaded the plain Hugging Face way, for direct generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = modelstore.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
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


@pytest.fixture(scope="module")
def demo_daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import start_daemon

    daemon = start_daemon(tmp_path_factory.mktemp("e2e"), "--workers", "2")
    try:
        daemon.wait_ready(timeout=300)
        yield daemon
    finally:
        assert daemon.stop(timeout=60) == 0


def test_greedy_output_equals_direct_transformers_generation(demo_daemon, reference):
    items: list[dict[str, Any]] = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PLAIN)]
    items += [{"id": f"c{i}", "messages": m} for i, m in enumerate(CHAT)]
    with demo_daemon.client(timeout=120) as client:
        results = {r.id: r for r in client.iter_results(items, max_new_tokens=MAX_NEW)}
    assert sorted(results) == sorted(i["id"] for i in items)
    for item in items:
        prompt = item.get("prompt", item.get("messages"))
        expected = direct_generate(reference, prompt, MAX_NEW)
        got = results[item["id"]]
        assert got.ok, got.error
        assert got.text == expected, f"{item['id']}: daemon {got.text!r} != direct {expected!r}"
        assert 0 < got.completion_tokens <= MAX_NEW


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
    assert len(workers) == 2
    assert all(w["state"] == "ready" and w["load_s"] > 0 for w in workers)
