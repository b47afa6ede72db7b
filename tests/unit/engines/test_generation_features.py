"""Structured output, logprobs, n samples and penalties: params, bounded decoding, the
wire rows and the synthetic engine's model of each (no model needed)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import msgpack
import pytest

from exgen.client import protocol as P
from exgen.daemon.engines.base import (
    Choice,
    Chunk,
    Failed,
    Finished,
    Job,
    JobRejected,
    SamplingParams,
)
from exgen.daemon.engines.synthetic import SyntheticEngine
from exgen.daemon.net import wire
from exgen.daemon.router import decode

LABEL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "label": {"enum": ["positive", "negative", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "kind": {"$ref": "#/$defs/kind"},
    },
    "required": ["name", "age", "label", "active", "kind"],
    "additionalProperties": False,
    "$defs": {"kind": {"anyOf": [{"type": "null"}, {"const": "person"}]}},
}


# --- params ---------------------------------------------------------------------------


def test_response_format_becomes_one_json_schema_param():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {}}}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    params = P.validate_params({"response_format": spec})
    # compact text, key order kept (the grammar writes properties in the schema's order)
    compact = '{"type":"object","properties":{"b":{"type":"integer"},"a":{}}}'
    assert params == {"json_schema": compact}
    assert P.validate_params({"response_format": {"type": "json_object"}}) == {
        "json_schema": P.JSON_OBJECT_SCHEMA
    }
    assert P.validate_params({"response_format": "json_object"}) == {
        "json_schema": P.JSON_OBJECT_SCHEMA
    }
    assert P.validate_params({"response_format": {"type": "text"}}) == {}
    assert P.validate_params({"json_schema": schema}) == {"json_schema": params["json_schema"]}
    assert P.validate_params({"json_schema": json.dumps(schema, indent=2)}) == params


def test_response_format_and_json_schema_together_is_refused():
    with pytest.raises(P.ValidationError) as info:
        P.validate_params({"response_format": "json_object", "json_schema": {"type": "object"}})
    assert info.value.field == "params.response_format"


@pytest.mark.parametrize(
    ("value", "field", "words"),
    [
        ({"type": "json_schema", "json_schema": {"schema": "[1]"}}, ".json_schema.schema", "obj"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, ".json_schema", "schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}, ".json_schema.x", "unkn"),
        ({"type": "grammar"}, ".type", "json_object"),
    ],
)
def test_a_bad_response_format_names_the_part(value, field, words):
    with pytest.raises(P.ValidationError) as info:
        P.validate_params({"response_format": value})
    assert info.value.field == "params.response_format" + field
    assert words in info.value.message


def test_a_schema_nested_too_deep_or_too_long_is_refused_before_any_engine():
    deep = {"type": "array", "items": {}}
    node = deep
    for _ in range(P.MAX_SCHEMA_DEPTH):
        node["items"] = {"type": "array", "items": {}}
        node = node["items"]
    for value in (deep, json.dumps(deep), "[" * 100_000, "x" * (P.MAX_SCHEMA_CHARS + 1)):
        with pytest.raises(P.ValidationError) as info:
            P.validate_params({"json_schema": value})
        assert info.value.field == "params.json_schema"


# --- bounded decoding ----------------------------------------------------------------


def _frame(params: dict) -> bytes:
    items = [
        {"id": "victim", "prompt": "p"},
        {"id": "x", "prompt": "p", "params": params},
    ]
    return msgpack.packb({"req": "r", "items": items})


def test_a_schema_crosses_the_wire_as_bounded_text():
    text = json.dumps(LABEL_SCHEMA)
    submit = decode.decode_submit(_frame({"json_schema": text, "n": 2, "logprobs": True})).submit()
    assert not submit.rejected
    assert json.loads(submit.items[1].params["json_schema"]) == LABEL_SCHEMA


@pytest.mark.parametrize(
    "params",
    [
        {"json_schema": "x" * (P.MAX_SCHEMA_CHARS + 1)},  # refused by its length, at decode
        {"json_schema": {"type": "object"}},  # a map on the wire: never decoded as one
        {"json_schema": [[[[[[[[[[[]]]]]]]]]]]},
        {"json_schema": "[" * 60_000},  # deep text: the protocol's parse stops it
    ],
)
def test_a_bad_schema_costs_its_item_only(params):
    submit = decode.decode_submit(_frame(params)).submit()
    assert [item.id for item in submit.items] == ["victim"]
    [(item_id, error)] = submit.rejected
    assert item_id == "x" and error.field.startswith("items[1].params")


# --- the worker's rows ----------------------------------------------------------------


def test_done_rows_carry_logprobs_choices_and_the_failed_field():
    lp = [["{", -0.1, [["{", -0.1], ["[", -2.5]]]]
    choices = [Choice("{}", P.FINISH_STOP, 1, lp), Choice("{ }", P.FINISH_LENGTH, 2, None)]
    events = [
        Finished(1, "{}", P.FINISH_STOP, 5, 3, lp, choices),
        Finished(2, "plain", P.FINISH_LENGTH, 5, 1),
    ]
    bad = [Failed(3, P.E_BAD_REQUEST, "no", "params.json_schema"), Failed(4, P.E_ENGINE, "x")]
    _, _, body = wire.pack_done(events, bad)
    finished, failed = wire.decode_done(msgpack.unpackb(body))
    assert finished == events
    assert failed == bad


# --- the synthetic engine ----------------------------------------------------------------


def _job(key: int, prompt: str, **params) -> Job:
    return Job(key, prompt, None, SamplingParams.from_wire(P.validate_params(params)))


def _run(engine: SyntheticEngine) -> list:
    events = []
    while engine.pending:
        events.extend(engine.step())
    return events


def _engine(**options: str) -> SyntheticEngine:
    engine = SyntheticEngine(None, options)
    engine.load()
    return engine


def test_synthetic_json_validates_and_differs_between_prompts():
    engine = _engine()
    for key in range(50):
        engine.add(_job(key, f"prompt {key}", json_schema=LABEL_SCHEMA, max_new_tokens=200))
    texts = set()
    for event in _run(engine):
        assert event.finish_reason == P.FINISH_STOP  # the JSON ended, as at an EOS
        jsonschema.validate(json.loads(event.text), LABEL_SCHEMA)
        assert event.completion_tokens == -(-len(event.text) // 4)
        texts.add(event.text)
    assert len(texts) > 40


def test_synthetic_json_mode_gives_an_object_and_a_short_budget_cuts_it():
    engine = _engine()
    engine.add(_job(1, "a", response_format={"type": "json_object"}))
    engine.add(_job(2, "a", json_schema=LABEL_SCHEMA, max_new_tokens=3))
    done = {e.key: e for e in _run(engine)}
    assert isinstance(json.loads(done[1].text), dict)
    assert done[2].finish_reason == P.FINISH_LENGTH and done[2].completion_tokens == 3
    with pytest.raises(ValueError):
        json.loads(done[2].text)


def test_a_schema_the_synthetic_engine_cannot_follow_is_a_per_item_error():
    engine = _engine()
    with pytest.raises(JobRejected) as info:
        engine.add(_job(1, "a", json_schema={"type": "string", "pattern": "^a+$"}))
    assert info.value.code == P.E_BAD_REQUEST and info.value.field == "params.json_schema"
    assert "pattern" in info.value.message
    with pytest.raises(JobRejected, match="does not resolve"):
        engine.add(_job(2, "a", json_schema={"$ref": "#/$defs/missing"}))
    engine.add(_job(3, "a", max_new_tokens=2))  # the engine goes on
    assert [e.key for e in _run(engine)] == [3]


def test_synthetic_n_samples_are_choices_and_the_first_is_the_single_sample():
    engine = _engine(token_ms="0.01")
    engine.add(_job(1, "hello", max_new_tokens=6))
    engine.add(Job(2, "hello", None, SamplingParams(max_new_tokens=6, n=4), stream=True))
    events = _run(engine)
    done = {e.key: e for e in events if isinstance(e, Finished)}
    single, many = done[1], done[2]
    assert single.choices is None
    assert many.choices is not None and len(many.choices) == 4
    assert many.text == many.choices[0].text == single.text
    assert len({c.text for c in many.choices}) == 4
    assert many.completion_tokens == 4 * 6
    streamed = "".join(e.text for e in events if isinstance(e, Chunk) and e.key == 2)
    # n > 1 streams its first sample (the final result completes the text, as for n = 1)
    assert streamed and many.text.startswith(streamed)


def test_synthetic_logprobs_have_the_shape_asked_for():
    engine = _engine()
    engine.add(_job(1, "hi", max_new_tokens=5, logprobs=True))
    engine.add(_job(2, "hi", max_new_tokens=5, top_logprobs=3, n=2))
    engine.add(_job(3, "hi", max_new_tokens=5, presence_penalty=1.5, frequency_penalty=-1.0))
    done = {e.key: e for e in _run(engine)}
    assert done[3].logprobs is None
    plain = done[1].logprobs
    assert plain is not None and len(plain) == 5
    assert "".join(token for token, _, _ in plain) == done[1].text
    assert all(top == [] and lp <= 0 for _, lp, top in plain)
    for choice in done[2].choices or []:
        assert choice.logprobs is not None and len(choice.logprobs) == 5
        for token, lp, top in choice.logprobs:
            assert len(top) == 3 and top[0] == [token, lp]
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


# --- batch files: OpenAI lines in, OpenAI shapes out -----------------------------------


def _line(body: dict, url: str = "/v1/chat/completions") -> Any:
    from exgen.client import batchfile as B

    [entry] = B.read_batch([json.dumps({"custom_id": "c1", "url": url, "body": body})])
    return entry


def test_openai_lines_map_response_format_logprobs_n_and_penalties():
    schema_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": LABEL_SCHEMA}}
    body = {
        "messages": [{"role": "user", "content": "Label this"}],
        "response_format": schema_format,
        "logprobs": True,
        "top_logprobs": 4,
        "n": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }
    chat = _line(body)
    assert json.loads(chat.params.pop("json_schema")) == LABEL_SCHEMA
    assert chat.params == {
        "logprobs": True,
        "top_logprobs": 4,
        "n": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }
    completion = _line({"prompt": "x", "logprobs": 2}, "/v1/completions")
    assert completion.params == {"logprobs": True, "top_logprobs": 2}
    json_object = {"type": "json_object"}
    json_mode = _line({"prompt": "x", "response_format": json_object}, "/v1/completions")
    assert json_mode.params == {"json_schema": P.JSON_OBJECT_SCHEMA}
    bad = _line({"prompt": "x", "logprobs": 6}, "/v1/completions")
    assert "body.logprobs" in bad.message


def _result(n: int, top: int) -> Any:
    from exgen.client.calls import Choice, Result, TokenLogprob

    def lps(text: str) -> list:
        return [TokenLogprob(ch, -0.5, [(ch, -0.5), ("z", -3.0)][:top]) for ch in text]

    texts = ["ab", "cd", "ef"][:n]
    choices = [Choice(i, t, P.FINISH_STOP, len(t), lps(t)) for i, t in enumerate(texts)]
    result = Result("c1", texts[0], P.FINISH_STOP, 4, sum(len(t) for t in texts))
    result.logprobs = choices[0].logprobs
    result.choices = choices if n > 1 else []
    return result


def test_openai_output_has_n_choices_and_logprobs_the_sdk_accepts():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from exgen.client import batchfile as B

    chat_line = _line({"messages": [{"role": "user", "content": "x"}], "n": 3, "logprobs": True})
    out = B.format_result(chat_line, _result(3, 2), default_model="m")
    body = ChatCompletion.model_validate(out["response"]["body"])
    assert [c.message.content for c in body.choices] == ["ab", "cd", "ef"]
    assert body.usage is not None and body.usage.completion_tokens == 6
    content = body.choices[1].logprobs.content  # type: ignore[union-attr]
    assert [t.token for t in content] == ["c", "d"] and content[0].bytes == [99]
    assert [a.token for a in content[0].top_logprobs] == ["c", "z"]

    completion_line = _line({"prompt": "x", "logprobs": 2}, "/v1/completions")
    out = B.format_result(completion_line, _result(1, 2), default_model="m")
    body = Completion.model_validate(out["response"]["body"])
    logprobs = body.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == ["a", "b"]
    assert logprobs.token_logprobs == [-0.5, -0.5] and logprobs.text_offset == [0, 1]
    assert logprobs.top_logprobs == [{"a": -0.5, "z": -3.0}, {"b": -0.5, "z": -3.0}]


def test_plain_lines_get_logprobs_and_choices_only_when_asked():
    from exgen.client import batchfile as B
    from exgen.client.calls import Result

    [line] = B.read_batch([json.dumps({"id": "p", "prompt": "x", "n": 3, "logprobs": True})])
    out = B.format_result(line, _result(3, 1))
    first = {"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5}]}
    assert out["logprobs"][0] == first
    assert [c["text"] for c in out["choices"]] == ["ab", "cd", "ef"]
    [plain] = B.read_batch([json.dumps({"id": "q", "prompt": "x"})])
    out = B.format_result(plain, Result("q", "t", P.FINISH_STOP, 1, 1))
    assert "logprobs" not in out and "choices" not in out
