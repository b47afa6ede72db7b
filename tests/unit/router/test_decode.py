"""The router's decoding of client frames: bounded shapes first, then the protocol's
checks; a bomb is refused at its first wrong element, a bad item costs only itself."""

from __future__ import annotations

import msgpack
import pytest

from exgen.client import protocol as P
from exgen.daemon.router import decode


def submit(items: list[dict[str, object]], **extra: object) -> bytes:
    return msgpack.packb({"req": "r", "items": items, **extra})


def test_a_good_submit_decodes_to_checked_items():
    envelope = decode.decode_submit(submit([{"id": "a", "prompt": "hi", "params": {"top_k": 3}}]))
    assert envelope.ids() == ["a"]
    checked = envelope.submit()
    assert [(i.id, i.prompt, i.params) for i in checked.items] == [("a", "hi", {"top_k": 3})]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"id": "a", "prompt": [0] * (P.MAX_PROMPT_IDS + 1)}, "items[0].prompt"),  # a bomb
        ({"id": "a", "prompt": [[0] * 10] * 1000}, "items[0].prompt"),  # ids are flat
        ({"id": "a", "messages": [[0] * 10] * 10}, "items[0].messages[0]"),
        ({"id": "a", "prompt": "x", "colour": 1}, "items[0].colour"),
        ({"id": "a", "prompt": "x", "params": {"top_k": [[0] * 5]}}, "items[0].params"),
    ],
)
def test_a_wrong_shape_rejects_that_item_alone(item, field):
    checked = decode.decode_submit(submit([item, {"id": "b", "prompt": "fine"}])).submit()
    assert [i.id for i in checked.items] == ["b"]
    [(item_id, error)] = checked.rejected
    assert item_id == "a" and error.field.startswith(field), error


def test_an_envelope_bomb_is_refused_naming_the_field_and_its_req_is_found():
    payload = msgpack.packb({"req": "bomb", "items": [0] * (P.MAX_ITEMS_PER_SUBMIT + 1)})
    with pytest.raises(P.ValidationError) as caught:
        decode.decode_submit(payload)
    assert caught.value.field == "items"
    assert decode.request_id(payload) == "bomb"
    with pytest.raises(P.ValidationError, match="stream"):
        decode.decode_submit(msgpack.packb({"req": "r", "items": [], "stream": [[0] * 9] * 9}))


def test_shared_params_are_checked_once_but_a_boolean_is_never_taken_for_one():
    items = [
        {"id": "a", "prompt": "x", "params": {"max_new_tokens": 1}},
        {"id": "b", "prompt": "x", "params": {"max_new_tokens": 1}},
        {"id": "c", "prompt": "x", "params": {"max_new_tokens": True}},
    ]
    checked = decode.decode_submit(submit(items)).submit()
    assert [i.id for i in checked.items] == ["a", "b"]
    assert checked.items[0].params is checked.items[1].params  # validated once
    assert [(i, e.field) for i, e in checked.rejected] == [("c", "items[2].params.max_new_tokens")]


def test_chat_messages_are_bounded_per_submit():
    messages = [{"role": "user", "content": "m"}] * P.MAX_MESSAGES
    count = P.MAX_MESSAGES_PER_SUBMIT // P.MAX_MESSAGES + 1
    items = [{"id": str(i), "messages": messages} for i in range(count)]
    checked = decode.decode_submit(submit(items)).submit()
    assert len(checked.items) == count - 1
    [(item_id, error)] = checked.rejected
    assert item_id == str(count - 1) and "chat messages in one submit" in error.message


def test_small_bodies_are_scalars_only_and_bounded():
    assert decode.decode_small(msgpack.packb({"req": "p"})) == {"req": "p"}
    with pytest.raises(P.ValidationError):
        decode.decode_small(msgpack.packb({"req": [0] * 10}))
    with pytest.raises(P.ValidationError, match="larger than"):
        decode.decode_small(msgpack.packb({"req": "x" * (decode.SMALL_BODY_BYTES + 1)}))


def test_the_nesting_walk_names_the_first_field_too_deep_and_reads_req() -> None:
    from exgen.daemon.router import nesting

    body = msgpack.packb({"req": "r9", "a": [1, "x", {"b": [[[[]]]]}], "c": 2})
    assert nesting.scan(body, limit=3) == nesting.Scan(too_deep="a[2].b", req="r9")
    assert nesting.scan(body) == nesting.Scan(too_deep=None, req="r9")


def test_the_nesting_walk_gives_up_after_its_step_budget() -> None:
    from exgen.daemon.router import nesting

    deep = b"\x91" * 50 + b"\xc0"
    flat_then_deep = b"\x82" + msgpack.packb("a") + msgpack.packb(list(range(1000)))
    flat_then_deep += msgpack.packb("b") + deep
    assert nesting.scan(flat_then_deep).too_deep == "b[0][0]"
    assert nesting.scan(flat_then_deep, max_steps=100).too_deep is None
    assert nesting.scan(deep, max_steps=100).too_deep == "[0][0][0]"
