"""The client's sans-IO session: retryable errors, resends after a daemon restart,
duplicate suppression. No sockets: messages are fed in by hand."""

from __future__ import annotations

from typing import Any

import pytest

from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.client import _Session


def session(n: int = 3, window: int = 100) -> tuple[_Session, dict[str, Any]]:
    items = [{"id": f"i{k}", "prompt": f"p{k}"} for k in range(n)]
    s = _Session(items, {}, window, stream=False)
    first = s.next_submit(0.0)
    assert first is not None
    return s, first


def ids_of(body: dict[str, Any] | None) -> list[str]:
    return [] if body is None else [w["id"] for w in body["items"]]


def result(item_id: str) -> dict[str, Any]:
    return {"id": item_id, "text": "t", "finish_reason": "length", "error": None}


@pytest.mark.parametrize("code", [P.E_BUSY, P.E_DRAINING])
def test_busy_and_draining_items_are_sent_again_not_failed(code):
    s, _ = session()
    s.on_message(P.ERROR, {"code": code, "message": "x", "items": ["i0", "i2"]}, 1.0)
    assert not s.ready, "a retryable error must not become a failed result"
    assert s.next_submit(1.0) is None, "resent only after a pause"
    assert ids_of(s.next_submit(10.0)) == ["i0", "i2"]


def test_a_repeated_retryable_error_queues_each_item_once():
    s, _ = session()
    for _ in range(3):
        s.on_message(P.ERROR, {"code": P.E_DRAINING, "message": "x", "items": ["i1"]}, 1.0)
    s.on_message(P.PONG, {"instance": "a"}, 1.0)
    s.on_message(P.PONG, {"instance": "b"}, 1.0)  # a restart on top: still once each
    assert sorted(ids_of(s.next_submit(10.0))) == ["i0", "i1", "i2"]


def test_a_new_daemon_instance_gets_every_unanswered_item_again():
    s, _ = session()
    s.on_message(P.ACCEPTED, {"req": "r", "n": 3, "instance": "old"}, 0.1)
    s.on_message(P.RESULTS, {"results": [result("i1")]}, 0.2)
    assert s.next_submit(0.3) is None
    s.on_message(P.PONG, {"instance": "new"}, 0.4)
    assert sorted(ids_of(s.next_submit(0.5))) == ["i0", "i2"]


def test_a_result_for_an_id_already_delivered_is_dropped():
    s, _ = session()
    s.on_message(P.RESULTS, {"results": [result("i0")]}, 0.1)
    s.on_message(P.RESULTS, {"results": [result("i0")]}, 0.2)
    assert [r.id for r in s.ready] == ["i0"]


def test_a_non_retryable_error_naming_items_fails_just_those():
    s, _ = session()
    s.on_message(
        P.ERROR, {"code": P.E_BAD_REQUEST, "message": "no", "field": "f", "items": ["i1"]}, 0.1
    )
    [failed] = list(s.ready)
    assert failed.id == "i1" and isinstance(failed.error, errors.BadRequest)


def test_a_request_level_error_without_items_is_raised():
    s, _ = session()
    with pytest.raises(errors.BadRequest):
        s.on_message(P.ERROR, {"code": P.E_BAD_REQUEST, "message": "bad", "field": "req"}, 0.1)


def test_a_submit_the_first_daemon_never_answered_is_sent_again_after_a_pong():
    # The daemon died before it answered anything: no instance was ever seen, so only
    # the ping/pong ordering can tell the submit was lost.
    s, _ = session()
    ping = s.ping_body(0.5)
    s.on_message(P.PONG, {"req": ping["req"], "instance": "new"}, 0.6)
    assert sorted(ids_of(s.next_submit(0.7))) == ["i0", "i1", "i2"]


def test_an_acknowledged_submit_is_not_sent_again_on_a_pong():
    s, first = session()
    s.on_message(P.ACCEPTED, {"req": first["req"], "n": 3, "instance": "a"}, 0.1)
    ping = s.ping_body(0.5)
    s.on_message(P.PONG, {"req": ping["req"], "instance": "a"}, 0.6)
    assert s.next_submit(0.7) is None


def test_a_pong_for_a_ping_sent_before_the_submit_proves_nothing():
    items = [{"id": "i0", "prompt": "p"}]
    s = _Session(items, {}, 100, stream=False)
    ping = s.ping_body(0.0)
    assert s.next_submit(0.5) is not None
    s.on_message(P.PONG, {"req": ping["req"], "instance": "a"}, 0.6)
    assert s.next_submit(0.7) is None
