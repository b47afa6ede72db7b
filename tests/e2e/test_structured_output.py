"""Structured output on the demo model (SmolLM2-135M-Instruct, transformers, CPU):
a 200-line OpenAI batch file asking for a JSON Schema (an object with typed fields and
an enum) gives 200 outputs that parse and validate; logprobs and n arrive in OpenAI's
shapes. Run as a user does: `exgen serve` and `exgen-client submit`."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import submit_batch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "family_friendly": {"type": "boolean"},
        "genre": {"enum": ["drama", "comedy", "horror", "science fiction", "documentary"]},
    },
    "required": ["title", "year", "rating", "family_friendly", "genre"],
    "additionalProperties": False,
}
TOPICS = ["a storm at sea", "a robot chef", "a haunted library", "two rival bakers", "Mars"]


def test_200_lines_with_a_json_schema_give_200_valid_outputs(demo_daemon, tmp_path):
    from openai.types.chat import ChatCompletion

    response_format = {"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}}
    lines = []
    for i in range(200):
        topic = TOPICS[i % len(TOPICS)]
        body = {
            "model": "SmolLM2",
            "messages": [
                {"role": "user", "content": f"Invent film number {i} about {topic}. Reply in JSON."}
            ],
            "response_format": response_format,
            "max_tokens": 120,
        }
        lines.append({"custom_id": f"film-{i}", "url": "/v1/chat/completions", "body": body})
    records = submit_batch(demo_daemon.address, lines, tmp_path, timeout=800)
    assert sorted(r["custom_id"] for r in records) == sorted(f"film-{i}" for i in range(200))
    titles = set()
    for record in records:
        body = ChatCompletion.model_validate(record["response"]["body"])
        [choice] = body.choices
        assert choice.finish_reason == "stop", choice.message.content
        film = json.loads(choice.message.content or "")
        jsonschema.validate(film, SCHEMA)
        titles.add(film["title"])
    assert len(titles) > 20  # the prompts differ, so do the films


def test_logprobs_and_n_in_openai_shapes(demo_daemon, tmp_path):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    chat = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 3,
        "n": 3,
        "temperature": 0.9,
        "seed": 5,
    }
    completion = {"prompt": "The capital of France is", "max_tokens": 5, "logprobs": 2}
    records = submit_batch(
        demo_daemon.address,
        [
            {"custom_id": "chat", "url": "/v1/chat/completions", "body": chat},
            {"custom_id": "cmpl", "url": "/v1/completions", "body": completion},
        ],
        tmp_path,
        timeout=800,
    )
    by_id = {r["custom_id"]: r for r in records}
    body = ChatCompletion.model_validate(by_id["chat"]["response"]["body"])
    assert [c.index for c in body.choices] == [0, 1, 2]
    for choice in body.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        for token in content:
            assert token.logprob <= 0 and len(token.top_logprobs) == 3
            assert [t.logprob for t in token.top_logprobs] == sorted(
                (t.logprob for t in token.top_logprobs), reverse=True
            )
    assert body.usage is not None and body.usage.completion_tokens >= 3
    text = Completion.model_validate(by_id["cmpl"]["response"]["body"])
    logprobs = text.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == text.choices[0].text
    assert "Paris" in text.choices[0].text
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
