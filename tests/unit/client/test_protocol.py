"""Protocol validation: every field a client sends is checked, with limits, and a
failure names the field. Framing refuses garbage and other versions."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exgen.client import protocol as P


def submit(items: Any, **extra: Any) -> dict[str, Any]:
    return {"req": "r", "items": items, **extra}


def one(**fields: Any) -> dict[str, Any]:
    return submit([{"id": "a", "prompt": "hi", **fields}])


def rejected_field(body: dict[str, Any]) -> str:
    """The field named for the (single) rejected item of a submit."""
    result = P.validate_submit(body)
    assert not result.items and len(result.rejected) == 1
    return result.rejected[0][1].field


# --- the envelope ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": [{"id": "a", "prompt": "x"}]}, "req"),
        (submit([{"id": "a", "prompt": "x"}], req=""), "req"),
        (submit([{"id": "a", "prompt": "x"}], req=7), "req"),
        (submit([{"id": "a", "prompt": "x"}], req="r" * (P.MAX_ID_CHARS + 1)), "req"),
        (submit("nope"), "items"),
        (submit([]), "items"),
        (submit([{"id": "a", "prompt": "x"}] * (P.MAX_ITEMS_PER_SUBMIT + 1)), "items"),
        (submit([{"id": "a", "prompt": "x"}], stream="yes"), "stream"),
        (submit(["not a map"]), "items[0].id"),
        (submit([{"prompt": "no id"}]), "items[0].id"),
        (submit([{"id": "", "prompt": "x"}]), "items[0].id"),
        (submit([{"id": 5, "prompt": "x"}]), "items[0].id"),
        (submit([{"id": "i" * (P.MAX_WIRE_ID_CHARS + 1), "prompt": "x"}]), "items[0].id"),
        (submit([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]), "items[1].id"),
    ],
)
def test_a_bad_envelope_is_refused_naming_the_field(body, field):
    with pytest.raises(P.ValidationError) as info:
        P.validate_submit(body)
    assert info.value.field == field
    assert field in str(info.value)


def test_limits_themselves_are_accepted():
    items = [{"id": str(i), "prompt": "x"} for i in range(P.MAX_ITEMS_PER_SUBMIT)]
    assert len(P.validate_submit(submit(items)).items) == P.MAX_ITEMS_PER_SUBMIT
    long_id = "i" * P.MAX_ID_CHARS
    assert P.validate_submit(submit([{"id": long_id, "prompt": "p" * P.MAX_PROMPT_CHARS}])).items


# --- items -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"id": "a"}, "items[0]"),  # neither prompt nor messages
        ({"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "items[0]"),
        ({"id": "a", "prompt": 3}, "items[0].prompt"),
        ({"id": "a", "prompt": "p" * (P.MAX_PROMPT_CHARS + 1)}, "items[0].prompt"),
        ({"id": "a", "prompt": "x", "colour": "red"}, "items[0].colour"),
        ({"id": "a", "messages": []}, "items[0].messages"),
        ({"id": "a", "messages": "hi"}, "items[0].messages"),
        ({"id": "a", "messages": ["hi"]}, "items[0].messages[0]"),
        ({"id": "a", "messages": [{"role": "boss", "content": "x"}]}, "items[0].messages[0].role"),
        ({"id": "a", "messages": [{"role": "user", "content": 1}]}, "items[0].messages[0].content"),
        (
            {"id": "a", "messages": [{"role": "user", "content": "x"}] * (P.MAX_MESSAGES + 1)},
            "items[0].messages",
        ),
        (
            {"id": "a", "messages": [{"role": "user", "content": "c" * P.MAX_PROMPT_CHARS}] * 2},
            "items[0].messages",
        ),
        ({"id": "a", "prompt": "x", "params": "hot"}, "items[0].params"),
    ],
)
def test_a_bad_item_is_rejected_alone_naming_the_field(item, field):
    body = submit([item, {"id": "good", "prompt": "fine"}])
    result = P.validate_submit(body)
    assert [i.id for i in result.items] == ["good"], "one bad item never costs the rest"
    [(item_id, error)] = result.rejected
    assert item_id == "a" and error.field == field


# --- sampling parameters ------------------------------------------------------------


BAD_PARAMS = [
    ("max_new_tokens", -1),  # 0 is a job that reads its prompt (echo, prompt_logprobs)
    ("max_new_tokens", P.MAX_NEW_TOKENS + 1),
    ("max_new_tokens", 1.5),
    ("max_new_tokens", "10"),
    ("max_new_tokens", True),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", None),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", 1_000_001),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", 101.0),
    ("seed", -1),
    ("seed", P.MAX_SEED + 1),
    ("seed", "42"),
    ("stop", 5),
    ("stop", [""]),
    ("stop", [3]),
    ("stop", ["s"] * (P.MAX_STOP_STRINGS + 1)),
    ("stop", ["s" * (P.MAX_STOP_CHARS + 1)]),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.5),
    ("frequency_penalty", float("nan")),
    ("frequency_penalty", "0.5"),
    ("n", 0),
    ("n", P.MAX_N + 1),
    ("n", 1.5),
    ("logprobs", 1),
    ("logprobs", "yes"),
    ("top_logprobs", -1),
    ("top_logprobs", P.MAX_TOP_LOGPROBS + 1),
    ("json_schema", 5),
    ("json_schema", "not json"),
    ("json_schema", "[1, 2]"),
    ("json_schema", "{" * 40),
    ("json_schema", "x" * (P.MAX_SCHEMA_CHARS + 1)),
    ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema"}),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": []}}),
    ("response_format", {"type": "json_object", "extra": 1}),
    ("response_format", 7),
]


@pytest.mark.parametrize(("name", "value"), BAD_PARAMS)
def test_every_parameter_is_range_checked_and_named(name, value):
    field = rejected_field(one(params={name: value}))
    assert field.startswith(f"items[0].params.{name}")


def test_an_unknown_parameter_is_named_with_the_known_ones():
    result = P.validate_submit(one(params={"temprature": 0.5}))
    [(_, error)] = result.rejected
    assert error.field == "items[0].params.temprature" and "temperature" in error.message


GOOD_PARAMS = {
    "max_new_tokens": P.MAX_NEW_TOKENS,
    "temperature": 100.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 1.0,
    "repetition_penalty": 0.01,
    "seed": P.MAX_SEED,
    "stop": ["s" * P.MAX_STOP_CHARS] * P.MAX_STOP_STRINGS,
    "presence_penalty": -2.0,
    "frequency_penalty": 2.0,
    "n": P.MAX_N,
    "logprobs": True,
    "top_logprobs": P.MAX_TOP_LOGPROBS,
    "json_schema": '{"type":"object","properties":{"a":' * 15 + "{}" + "}}" * 15,
    "ignore_eos": False,  # at their limits they cannot go with json_schema (below)
    "min_tokens": 0,
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
    "echo": True,
    "prompt_logprobs": P.MAX_TOP_LOGPROBS,
    "add_special_tokens": False,
}


def test_every_parameter_at_its_limit_is_accepted():
    [item] = P.validate_submit(one(params=GOOD_PARAMS)).items
    assert item.params == GOOD_PARAMS
    # response_format is another spelling of json_schema (tested below)
    assert set(GOOD_PARAMS) | {"response_format"} == P.PARAM_NAMES, (
        "a new parameter needs limits and tests"
    )


def test_vllm_extensions_at_their_limits_and_what_they_cannot_go_with():
    params = {"max_new_tokens": P.MAX_NEW_TOKENS, "min_tokens": P.MAX_NEW_TOKENS}
    assert P.validate_params({**params, "ignore_eos": True}) == {**params, "ignore_eos": True}
    for bad, name in (
        ({"max_new_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"ignore_eos": True, "response_format": "json_object"}, "ignore_eos"),
        ({"min_tokens": 2, "json_schema": '{"type":"object"}'}, "min_tokens"),
    ):
        with pytest.raises(P.ValidationError) as caught:
            P.validate_params(bad)
        assert caught.value.field == f"params.{name}"


def test_integral_floats_and_single_stop_strings_are_normalised():
    params = P.validate_params({"max_new_tokens": 8.0, "stop": "END", "seed": None})
    assert params == {"max_new_tokens": 8, "stop": ["END"]}
    assert isinstance(params["max_new_tokens"], int)


# --- framing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "words"),
    [
        ([b"x"], "expected 3 frames"),
        ([P.MAGIC_VERSION, P.SUBMIT], "expected 3 frames"),
        ([b"HTTP", P.SUBMIT, b"\x80"], "bad magic"),
        ([P.MAGIC + bytes([P.PROTOCOL_VERSION + 1]), P.SUBMIT, b"\x80"], "version"),
        ([P.MAGIC_VERSION, b"SS", b"\x80"], "one byte"),
        ([P.MAGIC_VERSION, P.SUBMIT, b"\xc1"], "not valid msgpack"),
        ([P.MAGIC_VERSION, P.SUBMIT, msgpack.packb([1, 2])], "must be a map"),
        ([P.MAGIC_VERSION, P.SUBMIT, msgpack.packb({1: 2})], "not valid msgpack"),
        ([P.MAGIC_VERSION, P.SUBMIT, b"\x81\xa1a"], "not valid msgpack"),  # truncated
    ],
)
def test_frames_that_are_not_this_protocol_raise_frame_error(frames, words):
    with pytest.raises(P.FrameError, match=words):
        P.unpack(frames)


def test_pack_unpack_round_trip():
    body = {"req": "r", "items": [{"id": "a", "prompt": "é"}], "raw": b"\x00"}
    assert P.unpack(P.pack(P.SUBMIT, body)) == (P.SUBMIT, body)


# Any msgpack-able body: validation either accepts it or raises ValidationError
# naming a field; it never raises anything else.
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["req", "items", "stream", "x"]),
        json_like | st.lists(st.dictionaries(st.sampled_from(sorted(P.ITEM_KEYS)), json_like)),
    )
)
def test_validation_never_raises_anything_but_validation_error(body):
    try:
        result = P.validate_submit(body)
    except P.ValidationError as exc:
        assert exc.field
        return
    for _, error in result.rejected:
        assert error.field.startswith("items[")


# --- version 2 item fields -------------------------------------------------------


def test_deadline_model_and_priority_are_checked_and_kept():
    body = submit([{"id": "a", "prompt": "x", "timeout_s": 2.5, "model": "m"}])
    body["priority"] = "batch"
    checked = P.validate_submit(body)
    assert checked.priority == "batch"
    assert (checked.items[0].timeout_s, checked.items[0].model) == (2.5, "m")
    assert checked.items[0].to_wire()["timeout_s"] == 2.5


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"timeout_s": 0}, "timeout_s"), ({"timeout_s": "1"}, "timeout_s"), ({"model": ""}, "model")],
)
def test_bad_deadline_or_model_rejects_that_item(extra, field):
    checked = P.validate_submit(submit([{"id": "a", "prompt": "x", **extra}]))
    assert checked.rejected[0][1].field == f"items[0].{field}"


def test_unknown_priority_is_refused():
    body = submit([{"id": "a", "prompt": "x"}])
    body["priority"] = "urgent"
    with pytest.raises(P.ValidationError, match="priority"):
        P.validate_submit(body)


def test_a_callers_id_limit_is_below_the_wires():
    with pytest.raises(P.ValidationError, match="longer than 256"):
        P.validate_item({"id": "i" * (P.MAX_ID_CHARS + 1), "prompt": "x"}, "item")
    wire_id = "i" * P.MAX_WIRE_ID_CHARS
    assert P.validate_submit(submit([{"id": wire_id, "prompt": "x"}])).items


SCHEMA_TEXT = '{"type":"object","properties":{"a":{"type":"integer"}}}'
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA_TEXT}}


@pytest.mark.parametrize(
    ("call_level", "own", "expected"),
    [
        ({"json_schema": SCHEMA_TEXT}, {"response_format": "json_object"}, P.JSON_OBJECT_SCHEMA),
        ({"response_format": "json_object"}, {"response_format": SCHEMA_FORMAT}, SCHEMA_TEXT),
        (
            {"response_format": SCHEMA_FORMAT},
            {"json_schema": {"type": "object"}},
            '{"type":"object"}',
        ),
        ({"json_schema": SCHEMA_TEXT}, {"response_format": {"type": "text"}}, None),
        ({"json_schema": SCHEMA_TEXT}, {"json_schema": None}, None),
        ({"json_schema": SCHEMA_TEXT}, {"temperature": 0.5}, SCHEMA_TEXT),
    ],
    ids=[
        "schema<-format",
        "format<-format",
        "format<-schema",
        "schema<-text",
        "schema<-none",
        "inherited",
    ],
)
def test_an_items_structured_output_replaces_the_calls_whichever_the_spelling(
    call_level, own, expected
):
    defaults = P.validate_params(call_level)
    params = P.validate_params(P.overlaid_params(defaults, own), "item.params")
    assert params.get("json_schema") == expected
    # the call's other params stay
    with_top_k = P.overlaid_params({**defaults, "top_k": 5}, own)
    assert P.validate_params(with_top_k)["top_k"] == 5


def test_both_spellings_in_one_params_map_stay_an_error():
    defaults = P.validate_params({"json_schema": SCHEMA_TEXT})
    own = {"response_format": "json_object", "json_schema": SCHEMA_TEXT}
    with pytest.raises(P.ValidationError, match="not both") as info:
        P.validate_params(P.overlaid_params(defaults, own), "item.params")
    assert info.value.field == "item.params.response_format"
    with pytest.raises(P.ValidationError, match="not both"):
        P.validate_params({"response_format": SCHEMA_FORMAT, "json_schema": None})


@pytest.mark.parametrize(
    ("in_text", "in_map"),
    [("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf), ("1e999", math.inf)],
)
def test_a_schema_holding_nan_or_infinity_is_refused_as_text_and_as_a_map(in_text, in_map):
    text = '{"type":"number","maximum":' + in_text + "}"
    as_map = {"type": "number", "maximum": in_map}
    messages = []
    for value in (text, as_map):
        with pytest.raises(P.ValidationError) as info:
            P.validate_params({"json_schema": value})
        assert info.value.field == "params.json_schema"
        messages.append(info.value.message)
        wrapped = {"type": "json_schema", "json_schema": {"name": "s", "schema": value}}
        with pytest.raises(P.ValidationError) as info:
            P.validate_params({"response_format": wrapped})
        assert info.value.field == "params.response_format.json_schema.schema"
    assert messages[0] == messages[1] and "NaN" in messages[0] and "Infinity" in messages[0]
    # a string that reads NaN is no number: fine
    assert P.validate_params({"json_schema": {"const": "NaN", "maximum": 1e308}})
