"""The client's sans-IO core: routing of many calls over one connection, the window,
retryable errors, resends after a daemon restart or a forgotten session, duplicate
suppression, abandoned calls, acknowledgements. No sockets: frames are fed by hand."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.calls import SUBMIT_BATCH
from exgen.client.core import ACK_DELAY_S, ACK_EVERY, TAG_SEP, Call, Core, Result


def core(**kw: Any) -> Core:
    kw.setdefault("timeout", None)
    kw.setdefault("connect_timeout", None)
    return Core("ipc:///nowhere", **kw)


def items(n: int, prefix: str = "i") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{k}", "prompt": f"p{k}"} for k in range(n)]


def sent(c: Core, now: float = 0.0) -> list[tuple[bytes, dict[str, Any]]]:
    return [P.unpack(out.frames) for out in c.poll_out(now)]


def submits(c: Core, now: float = 0.0) -> list[dict[str, Any]]:
    return [body for command, body in sent(c, now) if command == P.SUBMIT]


def wire_ids(bodies: list[dict[str, Any]]) -> list[str]:
    return [w["id"] for body in bodies for w in body["items"]]


def result(wire_id: str, text: str = "t") -> dict[str, Any]:
    return {"id": wire_id, "text": text, "finish_reason": "length", "error": None}


def open_call(c: Core, n: int = 3, window: int = 100, **kw: Any) -> tuple[Call, list[dict]]:
    call = c.open_call(items(n), {}, window=window, **kw)
    return call, submits(c)


SESSION = 7  # the daemon's number for this client's session


def answer(c: Core, call: Call, *ids: str, now: float = 1.0, **extra: Any) -> None:
    if "seq" in extra:
        extra.setdefault("session", SESSION)
    c.on_message(P.RESULTS, {"results": [result(call.prefix + i) for i in ids], **extra}, now)


# --- routing ---------------------------------------------------------------------


def test_results_find_their_call_by_tag_and_the_tag_is_stripped():
    c = core()
    a = c.open_call(items(2, "x"), {}, window=10)
    b = c.open_call(items(2, "x"), {}, window=10)  # the same caller ids, another call
    bodies = submits(c)
    assert sorted(wire_ids(bodies)) == sorted(
        [a.prefix + "x0", a.prefix + "x1", b.prefix + "x0", b.prefix + "x1"]
    )
    c.on_message(
        P.RESULTS, {"results": [result(b.prefix + "x1", "B"), result(a.prefix + "x0", "A")]}, 1.0
    )
    assert [(r.id, r.text) for r in a.ready] == [("x0", "A")]
    assert [(r.id, r.text) for r in b.ready] == [("x1", "B")]


def test_a_callers_longest_id_fits_the_wire_with_its_tag():
    c = core()
    for _ in range(5000):  # tags grow with the number of calls
        c._tag()
    long_id = "z" * P.MAX_ID_CHARS
    c.open_call([{"id": long_id, "prompt": "p"}], {}, window=1)
    [wire] = wire_ids(submits(c))
    assert wire.endswith(TAG_SEP + long_id) and len(wire) <= P.MAX_WIRE_ID_CHARS
    P.validate_submit({"req": "r", "items": [{"id": wire, "prompt": "p"}]})  # the router takes it


def test_a_status_request_is_answered_while_a_call_waits():
    c = core()
    call, _ = open_call(c)
    request = c.open_request(P.STATUS, {}, P.STATUS_REPLY, 0.5)
    [(command, body)] = sent(c, 0.5)
    assert command == P.STATUS
    c.on_message(P.STATUS_REPLY, {"req": body["req"], "queued": 3}, 0.6)
    assert request.done and request.result()["queued"] == 3
    assert call.outstanding and not call.ready


def test_a_request_error_fails_only_that_request():
    c = core()
    call, _ = open_call(c)
    request = c.open_request(P.CANCEL, {"clients": "all"}, P.CANCELLED, 0.5)
    [(_, body)] = sent(c, 0.5)
    c.on_message(P.ERROR, {"req": body["req"], "code": P.E_FORBIDDEN, "message": "no"}, 0.6)
    with pytest.raises(errors.Forbidden):
        request.result()
    assert call.error is None


# --- the window and the order ------------------------------------------------------


def test_the_source_is_read_lazily_within_the_window():
    pulled = []

    def source():
        for item in items(1000):
            pulled.append(item["id"])
            yield item

    c = core()
    call = c.open_call(source(), {}, window=8)
    assert len(wire_ids(submits(c))) == 8 and len(pulled) == 8
    answer(c, call, "i0")
    assert submits(c, 1.0) == [], "one free slot is not worth a submit (low water: 2)"
    answer(c, call, "i1")
    assert wire_ids(submits(c, 1.0)) == [call.prefix + "i8", call.prefix + "i9"]


def test_submit_frames_come_one_at_a_time_when_asked_and_none_is_lost():
    pulled = []

    def source():
        for item in items(3 * SUBMIT_BATCH + 5):
            pulled.append(item["id"])
            yield item

    c = core()
    c.open_call(source(), {}, window=10_000)
    c.open_call(items(3, "j"), {}, window=10)
    frames = []
    while True:
        out = [o for o in c.poll_out(0.0, submits=1) if o.submit is not None]
        assert len(out) <= 1
        if not out:
            break
        frames.append(P.unpack(out[0].frames)[1])
        assert len(pulled) <= len(frames) * SUBMIT_BATCH, "items read ahead of the frames"
    assert [len(body["items"]) for body in frames] == [SUBMIT_BATCH] * 3 + [5, 3]
    ids = [w.split(TAG_SEP)[-1] for w in wire_ids(frames)]
    assert sorted(ids) == sorted(
        [i["id"] for i in items(3 * SUBMIT_BATCH + 5)] + ["j0", "j1", "j2"]
    )


def test_an_ordered_call_hands_results_over_in_input_order():
    c = core()
    call, _ = open_call(c, 4, ordered=True)
    answer(c, call, "i2", "i1")
    assert not call.ready
    answer(c, call, "i0")
    assert [r.id for r in call.ready] == ["i0", "i1", "i2"]
    answer(c, call, "i3")
    assert [r.id for r in call.ready] == ["i0", "i1", "i2", "i3"]


def test_an_ordered_call_holds_at_most_its_window():
    c = core()
    call = c.open_call(items(100), {}, window=4, ordered=True)
    assert len(wire_ids(submits(c))) == 4
    answer(c, call, "i1", "i2", "i3")  # i0 holds the head: nothing handed over
    assert not call.ready and submits(c, 1.0) == [], "the window counts results held for order"
    answer(c, call, "i0")
    assert len(call.ready) == 4 and len(wire_ids(submits(c, 1.0))) == 4


def test_a_result_passed_in_is_yielded_in_its_place():
    c = core()
    mine = Result("local", "", "error")
    call = c.open_call([items(1)[0], mine, items(2)[1]], {}, window=10, ordered=True)
    assert len(wire_ids(submits(c))) == 2
    answer(c, call, "i1")
    assert not call.ready
    answer(c, call, "i0")
    assert [r.id for r in call.ready] == ["i0", "local", "i1"]
    assert call.ready[1] is mine


# --- retryable errors, restarts, lost submits ----------------------------------------


@pytest.mark.parametrize("code", [P.E_BUSY, P.E_DRAINING])
def test_busy_and_draining_items_are_sent_again_not_failed(code):
    c = core()
    call, _ = open_call(c)
    ids = [call.prefix + "i0", call.prefix + "i2"]
    c.on_message(P.ERROR, {"code": code, "message": "x", "items": ids}, 1.0)
    assert not call.ready, "a retryable error must not become a failed result"
    assert submits(c, 1.0) == [], "resent only after a pause"
    assert wire_ids(submits(c, 10.0)) == ids


def test_a_repeated_retryable_error_queues_each_item_once():
    c = core()
    call, _ = open_call(c)
    for _ in range(3):
        c.on_message(
            P.ERROR, {"code": P.E_DRAINING, "message": "x", "items": [call.prefix + "i1"]}, 1.0
        )
    c.on_message(P.PONG, {"instance": "a"}, 1.0)
    c.on_message(P.PONG, {"instance": "b"}, 1.0)  # a restart on top: still once each
    assert sorted(wire_ids(submits(c, 10.0))) == sorted(call.prefix + f"i{k}" for k in range(3))


def test_a_new_daemon_instance_gets_every_unanswered_item_of_every_call():
    c = core()
    a, first = open_call(c)
    b = c.open_call(items(1, "b"), {}, window=10)
    second = submits(c)
    for body in (*first, *second):
        c.on_message(P.ACCEPTED, {"req": body["req"], "n": 3, "instance": "old"}, 0.1)
    answer(c, a, "i1", now=0.2)
    assert submits(c, 0.3) == []
    c.on_message(P.PONG, {"instance": "new"}, 0.4)
    out = sent(c, 0.5)
    assert sorted(wire_ids([b for cmd, b in out if cmd == P.SUBMIT])) == sorted(
        [a.prefix + "i0", a.prefix + "i2", b.prefix + "b0"]
    )


def test_a_result_for_an_id_already_delivered_is_dropped():
    c = core()
    call, _ = open_call(c)
    answer(c, call, "i0")
    answer(c, call, "i0")
    assert [r.id for r in call.ready] == ["i0"]


def test_a_non_retryable_error_naming_items_fails_just_those():
    c = core()
    call, _ = open_call(c)
    body = {"code": P.E_BAD_REQUEST, "message": "no", "field": "f", "items": [call.prefix + "i1"]}
    c.on_message(P.ERROR, body, 0.1)
    [failed] = list(call.ready)
    assert failed.id == "i1" and isinstance(failed.error, errors.BadRequest)


def test_a_connection_level_error_fails_every_call():
    c = core()
    a, _ = open_call(c)
    b, _ = open_call(c)
    c.on_message(P.ERROR, {"code": P.E_PROTOCOL, "message": "bad"}, 0.1)
    for call in (a, b):
        with pytest.raises(errors.BadRequest):
            call.raise_error()


def test_a_submit_the_first_daemon_never_answered_is_sent_again_after_a_pong():
    # The daemon died before it answered anything: no instance was ever seen, so only
    # the ping/pong ordering can tell the submit was lost.
    c = core()
    open_call(c)
    request = c.open_request(P.PING, {}, P.PONG, 0.5)
    [(_, ping)] = sent(c, 0.5)
    c.on_message(P.PONG, {"req": ping["req"], "instance": "new"}, 0.6)
    assert request.done
    assert len(wire_ids(submits(c, 0.7))) == 3


def test_an_accepted_submit_is_not_sent_again_on_a_pong():
    c = core()
    _, [first] = open_call(c)
    c.on_message(P.ACCEPTED, {"req": first["req"], "n": 3, "instance": "a"}, 0.1)
    c.open_request(P.PING, {}, P.PONG, 0.5)
    [(_, ping)] = sent(c, 0.5)
    c.on_message(P.PONG, {"req": ping["req"], "instance": "a"}, 0.6)
    assert submits(c, 0.7) == []


def test_a_pong_for_a_ping_sent_before_the_submit_proves_nothing():
    c = core()
    c.open_request(P.PING, {}, P.PONG, 0.0)
    c.open_call(items(1), {}, window=10)
    out = sent(c, 0.0)
    assert [cmd for cmd, _ in out] == [P.PING, P.SUBMIT]  # the ping left first
    c.on_message(P.PONG, {"req": out[0][1]["req"], "instance": "a"}, 0.6)
    assert submits(c, 0.7) == []


def test_a_daemon_that_holds_nothing_gets_what_it_accepted_again():
    c = core(hello={"name": "me"})
    call, [first] = open_call(c)
    c.on_message(P.ACCEPTED, {"req": first["req"], "n": 3, "instance": "a"}, 0.1)
    answer(c, call, "i0")
    c.open_request(P.PING, {}, P.PONG, 1.5)
    [(_, ping)] = sent(c, 1.5)
    c.on_message(P.PONG, {"req": ping["req"], "instance": "a", "seq": 0, "known": False}, 1.6)
    out = sent(c, 1.7)
    assert [cmd for cmd, _ in out] == [P.SUBMIT]
    assert sorted(wire_ids([out[0][1]])) == [call.prefix + "i1", call.prefix + "i2"]


def test_a_forgotten_session_does_not_resend_what_left_after_the_ping():
    c = core()
    c.open_request(P.PING, {}, P.PONG, 0.0)
    [(_, ping)] = sent(c, 0.0)
    call, _ = open_call(c)  # submitted after the ping: the daemon may not have it yet
    c.on_message(P.PONG, {"req": ping["req"], "instance": "a", "seq": 0, "known": False}, 0.1)
    assert submits(c, 0.2) == [] and len(call.outstanding) == 3


# --- per-item checks on this side -------------------------------------------------------


def test_a_lone_surrogate_fails_its_item_alone():
    c = core()
    bad = {"id": "bad", "messages": [{"role": "user", "content": "ok \ud800"}]}
    call = c.open_call([items(1)[0], bad, items(2)[1]], {}, window=10)
    assert sorted(wire_ids(submits(c))) == [call.prefix + "i0", call.prefix + "i1"]
    [failed] = list(call.ready)
    assert failed.id == "bad" and isinstance(failed.error, errors.BadRequest)
    assert failed.error.field == "messages[0].content"


def test_the_calls_timeout_s_goes_with_each_item_unless_it_has_its_own():
    c = core()
    own = {"id": "own", "prompt": "p", "timeout_s": 5}
    c.open_call([items(1)[0], own], {}, window=10, timeout_s=30)
    [body] = submits(c)
    assert [w.get("timeout_s") for w in body["items"]] == [30, 5]


def test_a_batch_calls_submits_say_so_and_an_interactive_calls_say_nothing():
    c = core()
    c.open_call(items(2, "b"), {}, window=10, priority="batch")
    c.open_call(items(2, "i"), {}, window=10)
    by_priority = {body["items"][0]["id"][-2]: body.get("priority") for body in submits(c)}
    assert by_priority == {"b": "batch", "i": None}


@pytest.mark.parametrize("bad", ["urgent", None, 1])
def test_an_unknown_priority_is_a_bad_request_naming_the_field(bad):
    with pytest.raises(errors.BadRequest) as caught:
        core().open_call(items(1), {}, window=1, priority=bad)
    assert caught.value.field == "priority"


@pytest.mark.parametrize("bad", [0, -1, "soon", True, float("nan")])
def test_a_bad_call_timeout_is_a_bad_request(bad):
    with pytest.raises(errors.BadRequest):
        core().open_call(items(1), {}, window=1, timeout_s=bad)


def test_bad_params_and_bad_items_are_bad_requests():
    with pytest.raises(errors.BadRequest):
        core().open_call(items(1), {"temperature": -1}, window=1)
    for source in ([42], [{"prompt": "no id"}], [items(1)[0], items(1)[0]]):
        c = core()
        call = c.open_call(source, {}, window=10)
        c.poll_out(0.0)
        with pytest.raises(errors.BadRequest):
            call.raise_error()


# --- abandoned calls --------------------------------------------------------------------


def test_ending_a_call_with_work_out_cancels_exactly_that_work():
    c = core()
    a, _ = open_call(c)
    b, _ = open_call(c)
    answer(c, a, "i1")
    assert c.end_call(a) is True
    [(command, body)] = sent(c, 1.0)
    assert command == P.CANCEL and sorted(body["ids"]) == [a.prefix + "i0", a.prefix + "i2"]
    answer(c, a, "i0")  # the daemon's "cancelled" answers, or late results: dropped
    assert b.outstanding and c.end_call(a) is False


def test_ending_a_finished_call_sends_nothing():
    c = core()
    call, _ = open_call(c, 1)
    answer(c, call, "i0")
    assert c.end_call(call) is False and sent(c, 1.0) == []


# --- hello, connection events, timeouts ------------------------------------------------------


def test_hello_is_said_at_connect_and_after_a_reconnect_and_may_be_refused():
    c = core(hello={"name": "exgen-client submit x", "host": "h", "pid": 1})
    c.say_hello()
    [(command, body)] = sent(c)
    assert command == P.HELLO and body["name"] == "exgen-client submit x"
    c.on_message(P.ERROR, {"req": body["req"], "code": P.E_BAD_REQUEST, "message": "unknown"}, 0.1)
    call, _ = open_call(c)
    assert call.error is None, "an old daemon that does not know HELLO costs nothing"
    c.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0.2)
    assert sent(c, 0.2) == []
    c.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0.3)  # the second one is a reconnect
    assert P.HELLO in [cmd for cmd, _ in sent(c, 0.3)]


def test_welcome_and_accepted_name_the_served_model_on_each_result():
    c = core()
    call, [first] = open_call(c)
    c.on_message(
        P.ACCEPTED, {"req": first["req"], "n": 3, "instance": "a", "model": "SmolLM2"}, 0.1
    )
    answer(c, call, "i0")
    assert call.ready[0].model == "SmolLM2"


def test_refused_before_any_connection_fails_fast_but_not_after_one():
    c = core()
    call, _ = open_call(c)
    c.on_event(zmq.EVENT_CONNECT_RETRIED, 0.1)
    with pytest.raises(errors.ConnectionFailed, match="nothing is listening"):
        call.raise_error()
    c = core()
    call, _ = open_call(c)
    c.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0.1)
    c.on_event(zmq.EVENT_CONNECT_RETRIED, 0.2)  # the daemon restarting: wait for it
    assert call.error is None


def test_no_handshake_within_the_connect_timeout_is_a_connect_timeout():
    c = core(connect_timeout=5.0)
    call, _ = open_call(c)
    c.on_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 1.0)
    c.tick(4.0)
    assert call.error is None
    c.tick(5.5)
    with pytest.raises(errors.ConnectTimeout, match="refused this client's CURVE key"):
        call.raise_error()


def test_silence_past_the_timeout_fails_what_waits():
    c = core(timeout=3.0)
    call, _ = open_call(c)
    c.on_message(P.PONG, {"instance": "a"}, 1.0)
    c.tick(3.5)
    assert call.error is None
    c.tick(4.5)
    with pytest.raises(errors.Timeout):
        call.raise_error()


def test_pings_go_out_after_a_second_of_silence_only_while_work_is_out():
    c = core()
    assert [cmd for cmd, _ in sent(c, 10.0)] == []
    call, _ = open_call(c)
    c.on_message(P.ACCEPTED, {"req": "x", "instance": "a"}, 0.5)
    assert [cmd for cmd, _ in sent(c, 1.2)] == []
    assert [cmd for cmd, _ in sent(c, 1.6)] == [P.PING]
    assert [cmd for cmd, _ in sent(c, 2.0)] == []
    answer(c, call, "i0", "i1", "i2", now=2.1)
    assert [cmd for cmd, _ in sent(c, 9.0)] == []


# --- the delivery contract: seq, ACK, resend -------------------------------------------------


def acks(out: list[tuple[bytes, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [body for cmd, body in out if cmd == P.ACK]


def test_results_are_acknowledged_in_batches_not_one_by_one():
    c = core()
    call = c.open_call(items(200), {}, window=200)
    submits(c)
    for seq in range(1, ACK_EVERY):
        answer(c, call, f"i{seq}", now=1.0, seq=seq)
        assert acks(sent(c, 1.0)) == [], f"acknowledged after {seq} messages"
    answer(c, call, "i0", now=1.0, seq=ACK_EVERY)
    assert acks(sent(c, 1.0)) == [{"session": SESSION, "seq": ACK_EVERY}]
    answer(c, call, "i100", now=2.0, seq=ACK_EVERY + 1)
    assert acks(sent(c, 2.0 + ACK_DELAY_S / 2)) == []
    assert acks(sent(c, 2.0 + ACK_DELAY_S)) == [{"session": SESSION, "seq": ACK_EVERY + 1}]


def test_a_daemon_without_seq_is_never_acknowledged():
    c = core()
    call, _ = open_call(c)
    answer(c, call, "i0", "i1", "i2")
    assert acks(sent(c, 5.0)) == []


def test_a_skipped_seq_asks_for_a_resend_once_and_the_resend_fills_the_gap():
    c = core()
    call, _ = open_call(c, 4)
    answer(c, call, "i0", seq=1)
    answer(c, call, "i2", seq=3)  # seq 2 (i1) was lost on the link
    answer(c, call, "i3", seq=4)
    out = acks(sent(c, 1.0))
    assert out == [{"session": SESSION, "seq": 1, "resend": True}], "asked once, after no gap"
    answer(c, call, "i1", now=1.1, seq=2)
    answer(c, call, "i2", now=1.1, seq=3)  # redelivered: dropped as duplicates
    answer(c, call, "i3", now=1.1, seq=4)
    assert sorted(r.id for r in call.ready) == ["i0", "i1", "i2", "i3"]
    assert acks(sent(c, 1.1 + ACK_DELAY_S)) == [{"session": SESSION, "seq": 4}]


def test_a_pong_showing_an_ack_lost_gets_the_ack_again():
    # The daemon stops dispatching to a client that does not acknowledge; an ACK
    # lost with a link must not leave both sides waiting on each other.
    c = core()
    call, _ = open_call(c)
    answer(c, call, "i0", seq=1)
    answer(c, call, "i1", seq=2)
    assert acks(sent(c, 1.0 + ACK_DELAY_S)) == [{"session": SESSION, "seq": 2}]
    probe = {"req": None, "instance": "a", "session": SESSION, "seq": 2, "acked": 0}
    c.on_message(P.PONG, probe, 2.0)
    assert acks(sent(c, 2.0)) == [{"session": SESSION, "seq": 2}]
    c.on_message(P.PONG, {**probe, "acked": 2}, 3.0)
    assert acks(sent(c, 3.0)) == [], "nothing to send again once the daemon has it"


def test_a_pong_naming_a_seq_not_seen_asks_for_a_resend():
    c = core()
    call, _ = open_call(c)
    answer(c, call, "i0", seq=1)
    probe = {"req": None, "instance": "a", "session": SESSION, "seq": 3, "known": True}
    c.on_message(P.PONG, probe, 1.0)
    assert acks(sent(c, 1.0)) == [{"session": SESSION, "seq": 1, "resend": True}]
    c.on_message(P.PONG, probe, 1.5)
    assert acks(sent(c, 1.5)) == [], "not asked again at once"
    c.on_message(P.PONG, probe, 2.6)
    again = acks(sent(c, 2.6))
    assert again == [{"session": SESSION, "seq": 1, "resend": True}], "asked again: nothing came"


def test_a_new_instance_counts_seq_from_the_start():
    c = core()
    call, _ = open_call(c)
    answer(c, call, "i0", seq=1, instance="a")
    c.on_message(P.PONG, {"instance": "b", "session": 8, "seq": 0, "known": False}, 1.5)
    answer(c, call, "i1", now=2.0, seq=1, instance="b", session=8)
    assert acks(sent(c, 2.0 + ACK_DELAY_S)) == [{"session": 8, "seq": 1}]


def test_a_peer_that_took_the_connection_and_failed_the_handshake_gets_the_connect_timeout():
    c = core(connect_timeout=5.0)
    call, _ = open_call(c)
    c.on_event(zmq.EVENT_CONNECTED, 0.1)
    c.on_event(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, 0.1)
    c.on_event(zmq.EVENT_CONNECT_RETRIED, 0.2)  # a CURVE refusal looks like this
    assert call.error is None


def test_a_call_that_ends_acknowledges_everything_at_once():
    c = core()
    call, _ = open_call(c, 2)
    answer(c, call, "i0", seq=1)
    answer(c, call, "i1", seq=2)
    assert acks(sent(c, 1.0)) == []
    c.end_call(call)
    assert acks(sent(c, 1.0)) == [{"session": SESSION, "seq": 2}]


def test_a_streams_text_is_its_chunks_then_what_the_final_result_adds():
    c = core()
    call = c.open_call([{"id": "0", "prompt": "p"}], {}, window=1, stream=True)
    [body] = submits(c)
    wire = body["items"][0]["id"]
    c.on_message(P.CHUNKS, {"chunks": [[wire, "Once "], [wire, "upon"]]}, 0.1)
    assert call.take_text() == ["Once ", "upon"]
    assert call.final is None
    final = {**result(wire, "Once upon a time"), "prompt_tokens": 3, "completion_tokens": 4}
    c.on_message(P.RESULTS, {"results": [final]}, 0.2)
    assert call.take_text() == [" a time"]
    c.poll_out(0.3)
    assert call.finished
    assert call.final is not None
    assert (call.final.text, call.final.finish_reason) == ("Once upon a time", "length")
    assert (call.final.prompt_tokens, call.final.completion_tokens) == (3, 4)


def test_a_failed_stream_hands_its_chunks_over_then_raises():
    c = core()
    call = c.open_call([{"id": "0", "prompt": "p"}], {}, window=1, stream=True)
    wire = submits(c)[0]["items"][0]["id"]
    c.on_message(P.CHUNKS, {"chunks": [[wire, "half"]]}, 0.1)
    c.on_message(P.RESULTS, {"results": [P.result_error(wire, P.E_ENGINE, "boom")]}, 0.2)
    assert call.take_text() == ["half"]
    assert call.final is None
    with pytest.raises(errors.EngineError):
        call.raise_error()


def test_a_new_session_on_an_accepted_resends_all_but_that_submits_items():
    c = core(hello={"name": "me"})
    a, [first] = open_call(c, 3)
    c.on_message(P.ACCEPTED, {"req": first["req"], "n": 3, "instance": "i", "session": 1}, 0.1)
    answer(c, a, "i0", seq=1, session=1)
    b = c.open_call(items(2, "b"), {}, window=10)
    [second] = submits(c, 0.2)
    # The lease ran out meanwhile: this submit opened a new session.
    c.on_message(P.ACCEPTED, {"req": second["req"], "n": 2, "instance": "i", "session": 2}, 0.3)
    out = sent(c, 0.4)
    assert [cmd for cmd, _ in out] == [P.HELLO, P.SUBMIT], "named again, and resent"
    assert sorted(wire_ids([out[1][1]])) == [a.prefix + "i1", a.prefix + "i2"]
    assert b.outstanding, "the new session's own items are not resent"
    answer(c, a, "i1", now=0.5, seq=1, session=2)
    assert acks(sent(c, 0.5 + ACK_DELAY_S)) == [{"session": 2, "seq": 1}]


def test_a_probe_from_a_new_session_resends_everything_out():
    c = core()
    call, [first] = open_call(c, 2)
    c.on_message(P.ACCEPTED, {"req": first["req"], "n": 2, "instance": "i", "session": 1}, 0.1)
    c.on_message(P.PONG, {"req": None, "instance": "i", "session": 5, "seq": 0, "known": True}, 0.2)
    assert sorted(wire_ids(submits(c, 0.3))) == [call.prefix + "i0", call.prefix + "i1"]


def test_no_ack_goes_to_a_daemon_without_sessions():
    c = core()
    call, _ = open_call(c, 2)
    c.on_message(P.RESULTS, {"seq": 1, "results": [result(call.prefix + "i0")]}, 1.0)
    assert acks(sent(c, 5.0)) == []


def test_when_nothing_is_owed_any_more_a_gap_is_acknowledged_past():
    c = core()
    a, _ = open_call(c, 2)
    answer(c, a, "i0", seq=1)
    answer(c, a, "i1", seq=3)  # seq 2 was lost, but it held nothing this client waits on
    sent(c, 1.0)  # (the resend asked for)
    c.end_call(a)
    assert acks(sent(c, 1.1)) == [{"session": SESSION, "seq": 3}]


def test_while_another_call_waits_a_gap_is_not_acknowledged_past():
    c = core()
    a, _ = open_call(c, 1)
    b, _ = open_call(c, 1)
    answer(c, a, "i0", seq=1)
    answer(c, a, "i0", seq=3)  # seq 2 may hold b's result
    sent(c, 1.0)
    c.end_call(a)
    assert acks(sent(c, 1.1)) == [], "acknowledged what may hold another call's result"
    assert b.outstanding
