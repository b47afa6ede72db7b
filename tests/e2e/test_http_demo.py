"""The openai SDK against `exgen serve --http` on the real demo model, on CPU: the same
greedy text as the ZMQ client gives, streamed or not, and a small batch end to end,
every answer naming the model that wrote it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.integration.http_support import HttpDaemon, demo_over_http

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CHAT = [{"role": "user", "content": "Name a fruit that is yellow."}]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpDaemon]:
    with demo_over_http(tmp_path_factory.mktemp("demo")) as daemon:
        yield daemon


def test_chat_over_http_equals_the_zmq_client(demo: HttpDaemon) -> None:
    sdk = openai.OpenAI(base_url=demo.base_url, api_key="x", max_retries=0)
    served = sdk.models.list().data[0].id
    reply = sdk.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=16)
    assert isinstance(reply, ChatCompletion) and reply.model == served
    with demo.daemon.client(timeout=120) as client:
        [direct] = client.generate([{"messages": CHAT}], max_new_tokens=16)
    assert reply.choices[0].message.content == direct.text != ""
    assert reply.usage is not None and reply.usage.completion_tokens == direct.completion_tokens
    chunks = list(sdk.chat.completions.create(model="x", messages=CHAT, max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.text


def test_a_batch_on_the_demo_model(demo: HttpDaemon, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=demo.base_url, api_key="x", max_retries=0)
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "max_tokens": 12,
                  "messages": [{"role": "user", "content": question}]}}
        for i, question in enumerate(["What is 2+2?", "Say hello.", "Name a colour."])
    ]  # fmt: skip
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as f:
        file = sdk.files.create(file=f, purpose="batch")
    batch = sdk.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 300
    while batch.status != "completed" and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 3
    served = sdk.models.list().data[0].id
    for line in sdk.files.content(batch.output_file_id).text.splitlines():
        body = ChatCompletion.model_validate(json.loads(line)["response"]["body"])
        assert body.model == served and body.choices[0].message.content


def test_vllm_extensions_on_the_demo_model(demo: HttpDaemon) -> None:
    """ignore_eos, min_tokens, skip_special_tokens and include_stop_str_in_output, as a
    load generator or harness sends them, on a real tokenizer with a real EOS."""
    sdk = openai.OpenAI(base_url=demo.base_url, api_key="x", max_retries=0)

    def chat(**extra: object) -> tuple[str, str, int]:
        reply = sdk.chat.completions.create(
            model="x", messages=CHAT, max_tokens=48, extra_body=extra, timeout=300
        )
        assert reply.usage is not None
        choice = reply.choices[0]
        return choice.message.content or "", choice.finish_reason, reply.usage.completion_tokens

    text, reason, tokens = chat()
    assert reason == "stop" and tokens < 40, "the demo model's answer ends with its EOS"
    longer, reason, count = chat(ignore_eos=True)
    assert (reason, count) == ("length", 48) and longer.startswith(text)
    _, _, count = chat(min_tokens=tokens + 4)
    assert count >= tokens + 4
    shown, _, _ = chat(ignore_eos=True, skip_special_tokens=False)
    assert "<|im_end|>" in shown and "<|im_end|>" not in longer
    stop = text.split()[2]
    cut, reason, _ = chat(stop=[stop])
    kept, _, _ = chat(stop=[stop], include_stop_str_in_output=True)
    assert reason == "stop" and kept == cut + stop and text.startswith(kept)


def test_the_usage_says_how_much_of_a_repeated_prompt_the_prefix_cache_served(
    demo: HttpDaemon,
) -> None:
    # A long shared system prompt, then two different questions: the second request
    # finds the first one's prefix in the engine's cache, and says so where OpenAI does.
    system = "You are a careful assistant. " + "Answer in one short sentence. " * 12
    sdk = openai.OpenAI(base_url=demo.base_url, api_key="x", max_retries=0)
    usages = []
    for question in ("Name a red fruit.", "Name a green vegetable."):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        reply = sdk.chat.completions.create(model="x", messages=messages, max_tokens=4)  # type: ignore[arg-type]
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        usages.append(reply.usage)
    first, second = (u.prompt_tokens_details.cached_tokens for u in usages)  # type: ignore[union-attr]
    assert first == 0
    assert second is not None and 64 <= second < usages[1].prompt_tokens


@pytest.fixture(scope="module")
def demo32(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpDaemon]:
    """The demo model in float32: logprobs comparable to a reference within 1e-3."""
    with demo_over_http(tmp_path_factory.mktemp("demo32"), "dtype=float32") as daemon:
        yield daemon


def test_prompt_logprobs_equal_the_models_own(demo32: HttpDaemon) -> None:
    """The loglikelihood request (echo, logprobs, max_tokens 0) against transformers run
    directly on the same weights in float32, as lm-eval's hf backend computes them;
    and the same prompt as token ids gives the same numbers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exgen.daemon import modelstore

    path = modelstore.resolve_model(None, modelstore.models_dir())
    where = {"gguf_file": path.name} if path.suffix == ".gguf" else {}  # the demo model's
    folder = path.parent if where else path
    tokenizer = AutoTokenizer.from_pretrained(folder, **where)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **where)
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = tokenizer(text)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    sdk = openai.OpenAI(base_url=demo32.base_url, api_key="x", max_retries=0)
    with sdk:
        replies = [
            sdk.completions.create(
                model="x", prompt=prompt, max_tokens=0, echo=True, logprobs=1, timeout=300
            )
            for prompt in (text, ids)
        ]
    for reply in replies:
        lp = reply.choices[0].logprobs
        assert lp is not None and lp.token_logprobs[0] is None
        got = torch.tensor(lp.token_logprobs[1:])
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
        assert reply.choices[0].text == text
