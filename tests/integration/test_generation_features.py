"""Structured output, logprobs, n and penalties through a real daemon (synthetic engine):
the library and `exgen-client submit` with an OpenAI batch file, as a user runs them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from exgen.client import Client, errors
from tests.conftest import submit_batch

pytestmark = pytest.mark.timeout(180)

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genre": {"enum": ["drama", "comedy", "horror"]},
    },
    "required": ["title", "year", "genre"],
    "additionalProperties": False,
}


def test_the_library_gets_json_choices_and_logprobs(daemon_factory):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "2")
    with Client(daemon.address) as client:
        results = client.generate(
            [f"film {i}" for i in range(20)], json_schema=SCHEMA, max_new_tokens=100
        )
        for result in results:
            assert result.ok and result.finish_reason == "stop"
            jsonschema.validate(json.loads(result.text), SCHEMA)
        [many] = client.generate(["film"], n=3, top_logprobs=2, max_new_tokens=5)
        assert len(many.choices) == 3 and many.choices[0].text == many.text
        assert many.completion_tokens == 15
        for choice in many.choices:
            assert choice.logprobs is not None and len(choice.logprobs) == 5
            assert all(len(t.top) == 2 and t.logprob <= 0 for t in choice.logprobs)
        [bad, good] = client.generate(
            [
                {"id": "bad", "prompt": "x", "params": {"json_schema": {"$ref": "#/nowhere"}}},
                {"id": "good", "prompt": "x", "params": {"presence_penalty": 1.0}},
            ]
        )
        assert isinstance(bad.error, errors.BadRequest)
        assert bad.error.field == "params.json_schema" and "does not resolve" in str(bad.error)
        assert good.ok and good.text
        with pytest.raises(errors.BadRequest, match="not valid JSON") as info:
            client.generate(["x"], json_schema="{not json")
        assert info.value.field == "params.json_schema"


def test_an_openai_batch_file_with_structured_output_logprobs_and_n(daemon_factory, tmp_path):
    from openai.types.chat import ChatCompletion

    daemon = daemon_factory("--engine", "synthetic", "--workers", "2")
    response_format = {"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}}
    lines = []
    for i in range(30):
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": f"A film, as JSON ({i})"}],
            "response_format": response_format,
            "max_tokens": 100,
            "n": 2,
            "logprobs": True,
            "top_logprobs": 1,
        }
        lines.append({"custom_id": f"c{i}", "url": "/v1/chat/completions", "body": body})
    records = submit_batch(daemon.address, lines, tmp_path, timeout=120)
    assert sorted(r["custom_id"] for r in records) == sorted(f"c{i}" for i in range(30))
    for record in records:
        body = ChatCompletion.model_validate(record["response"]["body"])
        assert len(body.choices) == 2
        for choice in body.choices:
            assert choice.message.content is not None
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            assert choice.logprobs is not None and choice.logprobs.content
            tokens = "".join(t.token for t in choice.logprobs.content)
            assert tokens == choice.message.content

