"""The sans-IO core of one client connection: every call on a client, multiplexed.

:class:`Core` owns what one DEALER socket carries: any number of concurrent calls
(:class:`Call`: ``iter_results``, ``generate``, ``stream``) and requests
(:class:`Request`: ``status``, ``ping``, cancels of other clients) share it. It does
no I/O: the shells in ``client.py`` (:class:`~exgen.client.Client`, blocking, and
:class:`~exgen.client.AsyncClient`, asyncio) hand it what arrives and send what
:meth:`Core.poll_out` returns, so both behave alike by construction.

- **Routing.** Each call has a short tag; its item ids go on the wire as
  ``TAG.ID`` (a caller's ids are at most ``MAX_ID_CHARS``, the wire allows
  ``MAX_WIRE_ID_CHARS``), and a result finds its call by the tag, the tag stripped.
  Requests are matched by their ``req``. So a status or ping is answered while a
  stream runs, and three generate calls run at once.
- **Flow control.** At most ``window`` items per call are outstanding (an ordered
  call: taken and not yet handed to the caller), so a 100,000-line iterator is
  read lazily. A ``busy`` or ``draining`` answer names items the daemon did not
  take: they are sent again after a growing pause.
- **Nothing lost.** A daemon that restarted (``instance`` changed) or forgot this
  client (PONG ``known: false``) gets every accepted, unanswered item again, with
  the same ids; a submit the daemon never answered before a later ping's pong is
  sent again. A result for an id already answered is dropped: each id once.
- **Results owed until acknowledged** (docs/protocol.md, "The delivery contract"):
  RESULTS carry ``seq``; the core acknowledges cumulatively (``ACK``) every
  ``ACK_EVERY`` messages or ``ACK_DELAY_S``, asks for a resend when a gap shows (a
  seq skipped, or a PONG naming a seq not seen), and pings every
  ``PING_INTERVAL_S`` of silence while work is outstanding. A daemon that sends no
  ``seq`` is never acknowledged.
- **Abandoned calls cancel.** :meth:`Core.end_call` on a call with work still out
  queues a CANCEL for it (the shells call it when an iterator is closed, broken out
  of, or interrupted).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
import zmq

from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.calls import (
    BUSY_BACKOFF_S,
    CANCEL_BATCH,
    TAG_SEP,
    Call,
    Outgoing,
    Request,
    Result,
    StreamText,
    _Submit,
)
from exgen.client.transport import HANDSHAKE_FAILURES

__all__ = ["TAG_SEP", "Call", "Core", "Receipts", "Request", "Result"]

logger = logging.getLogger(__name__)

PING_INTERVAL_S = 1.0  # docs/protocol.md: at least every second of silence with work out
ACK_EVERY = 64  # RESULTS messages acknowledged at once at full speed
ACK_DELAY_S = 0.2  # the longest a received RESULTS message waits for its ACK
RESEND_RETRY_S = 1.0  # a resend asked for and not answered is asked for again
MAX_WAKEUP_S = 0.2  # the longest a shell sleeps before looking at the timers again


_REQ_KEY = msgpack.packb("req")
_ITEMS_KEY = msgpack.packb("items")
_STREAM_KEY = msgpack.packb("stream")
_PRIORITY_KEY = msgpack.packb("priority")


def submit_body(req: str, rows: list[bytes], stream: bool, priority: str) -> bytes:
    """A SUBMIT body, ``{"req", "items", "stream"[, "priority"]}``, from its items
    encoded one by one (the bytes ``msgpack.packb`` writes for the map itself); the
    default priority goes unsaid."""
    said = priority != "interactive"
    parts = [b"\x84" if said else b"\x83", _REQ_KEY, msgpack.packb(req), _ITEMS_KEY]
    parts += [P.array_header(len(rows)), *rows, _STREAM_KEY, msgpack.packb(stream)]
    if said:
        parts += [_PRIORITY_KEY, msgpack.packb(priority)]
    return b"".join(parts)


class Receipts:
    """The delivery contract's books (docs/protocol.md): the session the daemon keeps
    for this client, which of its RESULTS messages came without a gap, and how far
    they are acknowledged. Nothing is acknowledged before a session is known (a
    daemon that numbers nothing is never sent an ACK)."""

    __slots__ = ("acked", "asked", "due_at", "highest", "seen", "session")

    def __init__(self) -> None:
        self.session: int | None = None
        self.highest = 0  # the highest RESULTS seq that arrived
        self.seen = 0  # every RESULTS seq up to this one arrived
        self.acked = 0  # and up to this one is acknowledged
        self.due_at: float | None = None  # when the oldest unacknowledged one must be
        self.asked: tuple[int, float] | None = None  # a resend asked for: (seen then, when)

    def arrived(self, seq: int, now: float) -> bool:
        """Note a RESULTS seq; True when it shows a gap (a message lost before it).

        A seq at or below ``seen`` is a redelivery of what we hold (its results drop as
        duplicates); one past a gap counts only once the resend has filled the gap.
        """
        self.highest = max(self.highest, seq)
        if seq == self.seen + 1:
            self.seen = seq
            if self.due_at is None:
                self.due_at = now + ACK_DELAY_S
            return False
        return seq > self.seen + 1

    def ack_all(self, nothing_owed: bool) -> dict[str, Any] | None:
        """An ACK of everything that came, if anything is unacknowledged (a call ended:
        the daemon need not hold its last results until the next ACK_DELAY_S). With
        ``nothing_owed`` (no call waits on anything) a gap no longer matters: what came
        after it is acknowledged too, so the daemon drops what is lost in it."""
        if nothing_owed:
            self.seen = max(self.seen, self.highest)
        if self.session is None or self.seen <= self.acked:
            return None
        return self._ack()

    def ack_due(self, now: float) -> dict[str, Any] | None:
        """An ACK body when one is due: ACK_EVERY messages, or ACK_DELAY_S, behind."""
        if self.session is None or self.seen <= self.acked or self.due_at is None:
            return None
        if self.seen - self.acked < ACK_EVERY and now < self.due_at:
            return None
        return self._ack()

    def resend_request(self, now: float) -> dict[str, Any] | None:
        """An ACK asking for everything above ``seen`` again, unless just asked."""
        asked = self.asked
        if self.session is None:
            return None
        if asked is not None and asked[0] == self.seen and now - asked[1] < RESEND_RETRY_S:
            return None
        self.asked = (self.seen, now)
        return {**self._ack(), "resend": True}

    def ack_again(self, daemon_acked: int) -> dict[str, Any] | None:
        """An ACK of what came, when the daemon's own count (``daemon_acked``, from a
        PONG) shows an earlier ACK of ours lost."""
        if self.session is None or daemon_acked >= self.seen:
            return None
        return self._ack()

    def _ack(self) -> dict[str, Any]:
        self.acked = self.seen
        self.due_at = None
        return {"session": self.session, "seq": self.seen}

    def start(self, session: int | None) -> None:
        """A new session (a daemon restart, a forgotten lease): seq counts from 1."""
        self.session = session
        self.seen = self.acked = self.highest = 0
        self.due_at = None
        self.asked = None


class Core:
    """The state of one connection and every call on it. No sockets here."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None,
        connect_timeout: float | None,
        hello: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.hello = hello
        self.calls: dict[str, Call] = {}
        self.requests: dict[str, Request] = {}
        self.submits: dict[str, _Submit] = {}  # sent, not yet ACCEPTED or refused
        self.pings: dict[str, int] = {}  # the core's own pings: req -> send order
        self.hellos: set[str] = set()
        self.control: deque[Outgoing] = deque()  # frames queued for the next poll_out
        self.touched: set[Call | Request] = set()  # given news since take_touched()
        self.counter = itertools.count()
        self.instance: str | None = None  # the daemon run we are talking to
        self.model: str | None = None  # the model it serves (WELCOME, ACCEPTED)
        self.welcome: dict[str, Any] | None = None
        self.last_heard = 0.0
        self.last_ping = 0.0
        self.working_since: float | None = None  # since when work has been outstanding
        self.first_send_at: float | None = None
        self.handshakes = 0
        self.reached = False  # a connection was made (the ZMTP handshake may still fail)
        self.handshake_failure: str | None = None
        self.receipts = Receipts()

    # --- calls and requests --------------------------------------------------------

    def open_call(
        self, items: Iterable[Mapping[str, Any] | Result], params: Mapping[str, Any], **kw: Any
    ) -> Call:
        call = Call(self._tag(), items, params, **kw)
        self.calls[call.tag] = call
        return call

    def end_call(self, call: Call) -> bool:
        """The caller is done with ``call``; True when work of it had to be cancelled."""
        if self.calls.pop(call.tag, None) is None:
            return False
        for req in [r for r, s in self.submits.items() if s.call is call]:
            del self.submits[req]
        cancels = call.cancel_frames()
        self.control.extend(cancels)
        ack = self.receipts.ack_all(not self.has_work())
        if ack is not None:
            self.control.append(Outgoing(P.pack(P.ACK, ack)))
        if cancels:
            logger.info(
                "cancelling %d unfinished items of an abandoned call", len(call.outstanding)
            )
        call.forget_outstanding()
        return bool(cancels)

    def open_request(
        self,
        command: bytes,
        body: dict[str, Any],
        expect: bytes,
        now: float,
        timeout: float | None = None,
    ) -> Request:
        """A request answered by one reply; ``timeout``: its own (default: the core's)."""
        order = next(self.counter)
        req = f"q{order}"
        request = Request(req, order, expect, now, timeout)
        self.requests[req] = request
        self.control.append(Outgoing(P.pack(command, {**body, "req": req})))
        return request

    def end_request(self, request: Request) -> None:
        self.requests.pop(request.req, None)

    def cancel_ids(self, ids: Iterable[str]) -> int:
        """Cancel a caller's items, wherever a call of this client has them out."""
        wanted = set(ids)
        wire_ids = [
            call.prefix + item_id
            for call in self.calls.values()
            for item_id in wanted
            if call.prefix + item_id in call.outstanding
        ]
        for i in range(0, len(wire_ids), CANCEL_BATCH):
            self.control.append(Outgoing(P.pack(P.CANCEL, {"ids": wire_ids[i : i + CANCEL_BATCH]})))
        return len(wire_ids)

    def say_hello(self) -> None:
        """HELLO (again): names this client in the daemon's status; after a reconnect."""
        if self.hello is None:
            return
        req = f"hello-{next(self.counter)}"
        self.hellos.add(req)
        self.control.append(Outgoing(P.pack(P.HELLO, {**self.hello, "req": req})))

    def _tag(self) -> str:
        n = next(self.counter)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"
        tag = ""
        while True:
            n, r = divmod(n, 36)
            tag = digits[r] + tag
            if n == 0:
                return tag

    # --- what to send ----------------------------------------------------------------

    def poll_out(self, now: float, submits: int | None = None) -> list[Outgoing]:
        """Everything to send now: control frames, submits, a ping, an ACK.

        ``submits``: at most this many submit frames (None: every one the windows
        allow). The shells take one at a time and send it before building the next,
        so a big first window does not keep the daemon waiting for its first frame
        until all of them are encoded (75 ms for 9,600 items of 2.4 KB).
        """
        out = list(self.control)
        self.control.clear()
        room = submits
        for call in list(self.calls.values()):
            if room is not None and room <= 0:
                break
            try:
                room = self._submits_of(call, now, out, room)
            except Exception as exc:  # the caller's iterator failed, or a bad item
                call.fail(exc)
                self.touched.add(call)
        if out:
            self._note_sending(now)
        if self._ping_due(now):
            out.append(Outgoing(P.pack(P.PING, self._ping_body(now))))
        ack = self.receipts.ack_due(now)
        if ack is not None:
            out.append(Outgoing(P.pack(P.ACK, ack)))
        return out

    def _submits_of(
        self, call: Call, now: float, out: list[Outgoing], room: int | None
    ) -> int | None:
        """Submit frames of ``call`` onto ``out``, at most ``room`` of them (None: no
        bound); the room left."""
        while room is None or room > 0:
            batch = call.next_batch(now)
            if not batch:
                if call.ready or call.finished:
                    self.touched.add(call)  # answered on this side, or all done
                return room
            if call.ready:
                self.touched.add(call)  # some were answered on this side (unencodable)
            order = next(self.counter)
            req = f"s{order}"
            rows = call.rows
            body = submit_body(req, [rows[i] for i in batch], call.stream, call.priority)
            submit = _Submit(req, call, order, batch)
            self.submits[req] = submit
            out.append(Outgoing([P.MAGIC_VERSION, P.SUBMIT, body], submit))
            if room is not None:
                room -= 1
        return room

    def not_sent(self, outgoing: Outgoing) -> None:
        """A frame that could not leave (no peer): a submit's items go out again."""
        submit = outgoing.submit
        if submit is not None:
            self.submits.pop(submit.req, None)
            submit.call.queue_resend(submit.ids)

    def _note_sending(self, now: float) -> None:
        if self.first_send_at is None:
            self.first_send_at = now
        if self.working_since is None:
            self.working_since = now

    def has_work(self) -> bool:
        """Whether anything is owed to a caller by the daemon."""
        if self.requests:
            return True
        return any(call.outstanding for call in self.calls.values())

    def _ping_due(self, now: float) -> bool:
        if not self.has_work():
            return False
        return now - max(self.last_heard, self.last_ping) >= PING_INTERVAL_S

    def _ping_body(self, now: float) -> dict[str, Any]:
        order = next(self.counter)
        req = f"ping-{order}"
        self.pings[req] = order
        self.last_ping = now
        return {"req": req}

    def _ack_again(self, daemon_acked: int) -> None:
        """The daemon has fewer ACKs than we sent (one was lost with a link): it holds
        results we have, and would stop dispatching our items. Acknowledge them again."""
        ack = self.receipts.ack_again(daemon_acked)
        if ack is not None:
            self.control.append(Outgoing(P.pack(P.ACK, ack)))

    def _ask_resend(self, now: float) -> None:
        """Results were lost on the way: every RESULTS above what we hold, again."""
        ask = self.receipts.resend_request(now)
        if ask is not None:
            logger.warning("results lost on the link; asking for those after seq %d", ask["seq"])
            self.control.append(Outgoing(P.pack(P.ACK, ask)))

    # --- what arrives ----------------------------------------------------------------

    def on_frames(self, frames: list[bytes], now: float) -> None:
        try:
            command, body = P.unpack(frames)
        except P.FrameError as exc:
            self.fail_all(errors.ProtocolMismatch(f"from {self.address}: {exc}"))
            return
        self.on_message(command, body, now)

    def on_message(self, command: bytes, body: dict[str, Any], now: float) -> None:
        self.last_heard = now
        instance = body.get("instance")
        if instance is not None and instance != self.instance:
            self._note_instance(instance)
        session = body.get("session")
        if session is not None and session != self.receipts.session:
            self._note_session(session, command, body)
        if command == P.RESULTS:
            self._on_results(body, now)
        elif command == P.CHUNKS:
            self._on_chunks(body)
        elif command == P.ACCEPTED:
            self._on_accepted(body)
        elif command == P.ERROR:
            self._on_error(body, now)
        elif command == P.PONG:
            self._on_pong(body, now)
        elif command == P.WELCOME:
            self._on_welcome(body)
        else:
            self._on_reply(command, body)

    def _on_results(self, body: dict[str, Any], now: float) -> None:
        seq = body.get("seq")
        if isinstance(seq, int):
            self._on_seq(seq, now)
        calls, model = self.calls, self.model
        if len(calls) == 1:  # the common case: no routing (another call's id is not out)
            [only] = calls.values()
            self.touched.add(only)
            only.on_results(body.get("results", ()), now, model)
            return
        last_tag: str | None = None
        call: Call | None = None
        for res in body.get("results", ()):
            wire_id = res.get("id")
            if not isinstance(wire_id, str):
                continue
            tag = wire_id.partition(TAG_SEP)[0]
            if tag != last_tag:
                last_tag, call = tag, calls.get(tag)
                if call is not None:
                    self.touched.add(call)
            if call is not None:
                call.on_result(wire_id, res, now, model)

    def _on_seq(self, seq: int, now: float) -> None:
        if self.receipts.arrived(seq, now):
            self._ask_resend(now)  # its results are kept; the resend fills the gap

    def _on_chunks(self, body: dict[str, Any]) -> None:
        for row in body.get("chunks", ()):
            wire_id = row[0]
            call = self.calls.get(str(wire_id).partition(TAG_SEP)[0])
            if call is not None and wire_id in call.outstanding:
                call.chunks.append(StreamText.of(row))
                self.touched.add(call)

    def _on_accepted(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if isinstance(model, str) and model:
            self.model = model
        submit = self.submits.pop(str(body.get("req")), None)
        if submit is not None:
            submit.call.busy_wait = BUSY_BACKOFF_S[0]

    def _on_error(self, body: dict[str, Any], now: float) -> None:
        req = body.get("req")
        submit = self.submits.pop(req, None) if isinstance(req, str) else None
        if isinstance(req, str) and req in self.hellos:
            self.hellos.discard(req)  # a daemon that does not know HELLO: fine
            return
        request = self.requests.get(req) if isinstance(req, str) else None
        if request is not None:
            request.fail(errors.error_from_wire(body))
            self.touched.add(request)
            return
        items = body.get("items")
        if not items and submit is not None:
            items = submit.ids  # the whole submit refused: each of its items answered
        if items:
            self._route_item_error([str(i) for i in items], body, now)
            return
        self.fail_all(errors.error_from_wire(body))

    def _route_item_error(self, wire_ids: list[str], body: dict[str, Any], now: float) -> None:
        by_call: dict[str, list[str]] = {}
        for wire_id in wire_ids:
            by_call.setdefault(wire_id.partition(TAG_SEP)[0], []).append(wire_id)
        for tag, ids in by_call.items():
            call = self.calls.get(tag)
            if call is not None:
                call.on_item_error(ids, body, now)
                self.touched.add(call)

    def _on_pong(self, body: dict[str, Any], now: float) -> None:
        req = str(body.get("req"))
        order = self.pings.pop(req, None)
        if order is None and req in self.requests:
            order = self.requests[req].order
            self._on_reply(P.PONG, body)
        if order is not None:
            self._resend_lost_submits(order)
        seq, acked = body.get("seq"), body.get("acked")
        if isinstance(seq, int) and seq > self.receipts.seen:
            self._ask_resend(now)
        elif isinstance(acked, int) and acked < self.receipts.seen:
            self._ack_again(acked)
        if body.get("known") is False and order is not None:
            self._on_forgotten(order)

    def _resend_lost_submits(self, ping_order: int) -> None:
        """The daemon answers in order: a pong for a ping sent after a submit that got
        no answer means the submit was lost (sent to a daemon that then died)."""
        for req in [r for r, s in self.submits.items() if s.order < ping_order]:
            submit = self.submits.pop(req)
            logger.warning("a submit of %d items got no answer; sending it again", len(submit.ids))
            submit.call.queue_resend(submit.ids)

    def _note_session(self, session: Any, command: bytes, body: dict[str, Any]) -> None:
        """Another session than ours: the daemon forgot this client (its lease ran out
        while the client was away). Every item out is submitted again, but those of
        the ACCEPTED that says so (they are the new session's), and we say HELLO."""
        if type(session) is not int:
            return
        previous = self.receipts.session
        self.receipts.start(session)
        if previous is None:
            return  # the first session we hear of
        submit = self.submits.get(str(body.get("req"))) if command == P.ACCEPTED else None
        new = set(submit.ids) if submit is not None else set()
        total = 0
        for call in self.calls.values():
            lost = [i for i in call.outstanding if i not in new]
            call.queue_resend(lost)
            total += len(lost)
        logger.warning(
            "the daemon started a new session for this client; resending %d items", total
        )
        if command != P.WELCOME:
            self.say_hello()

    def _on_forgotten(self, ping_order: int) -> None:
        """The daemon holds nothing for us (a lost submit; our lease expired while we
        were away): every accepted, unanswered item is submitted again."""
        later = {i for s in self.submits.values() if s.order > ping_order for i in s.ids}
        total = 0
        for call in self.calls.values():
            lost = [i for i in call.outstanding if i not in later]
            call.queue_resend(lost)
            total += len(lost)
        if total:
            logger.warning("the daemon holds nothing for this client; resending %d items", total)

    def _on_welcome(self, body: dict[str, Any]) -> None:
        self.hellos.discard(str(body.get("req")))
        self.welcome = body
        model = body.get("model")
        if isinstance(model, str) and model:
            self.model = model

    def _on_reply(self, command: bytes, body: dict[str, Any]) -> None:
        request = self.requests.get(str(body.get("req")))
        if request is not None and command == request.expect and not request.done:
            request.reply = body
            self.touched.add(request)

    def _note_instance(self, instance: Any) -> None:
        """A new daemon run has lost what the old one accepted: send it all again."""
        if not isinstance(instance, str):
            return
        if self.instance is not None:
            self.submits.clear()  # the old run's answers will never come
            total = 0
            for call in self.calls.values():
                call.queue_resend(list(call.outstanding))
                total += len(call.outstanding)
            logger.warning("the exgen daemon restarted; resending %d items", total)
            self.receipts.start(None)
            self.say_hello()
        self.instance = instance

    def on_event(self, event: int, now: float) -> None:
        """A socket monitor event of our DEALER (transport.MONITORED)."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshakes += 1
            self.handshake_failure = None
            if self.handshakes > 1:  # a reconnect: name ourselves, and look for gaps now
                self.say_hello()
                if self.has_work():
                    self.last_ping = 0.0
                    self.last_heard = min(self.last_heard, now - PING_INTERVAL_S)
        elif event == zmq.EVENT_CONNECTED:
            self.reached = True
        elif event in HANDSHAKE_FAILURES:
            self.handshake_failure = HANDSHAKE_FAILURES[event]
        elif event == zmq.EVENT_CONNECT_RETRIED and not (self.handshakes or self.reached):
            # Refused, and never reached at all: nobody listens there. (A peer that
            # took the connection and failed the handshake, a CURVE refusal, is given
            # the connect timeout: its keys may yet be allowed.)
            self.fail_all(
                errors.ConnectionFailed(
                    f"nothing is listening at {self.address} (connection refused)"
                ),
                waiting_only=True,
            )

    # --- timers ------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Timeouts: the daemon silent too long, or never connected."""
        if not self.has_work():
            self.working_since = None
            return
        started = self.working_since if self.working_since is not None else now
        if self._connect_overdue(now, started):
            why = f": {self.handshake_failure}" if self.handshake_failure else ""
            self.fail_all(
                errors.ConnectTimeout(
                    f"could not connect to {self.address} within {self.connect_timeout:g}s{why}"
                ),
                waiting_only=True,
            )
            return
        for request in self.requests.values():
            limit = request.timeout if request.timeout is not None else self.timeout
            if limit is not None and now - request.sent_at > limit and not request.done:
                request.fail(self._timeout_error(limit))
                self.touched.add(request)
        if self.timeout is None:
            return
        silent = now - max(self.last_heard, started)
        if silent > self.timeout:
            self.fail_all(self._timeout_error(self.timeout), waiting_only=True)

    def _connect_overdue(self, now: float, started: float) -> bool:
        if self.handshakes or self.connect_timeout is None:
            return False
        return now - (self.first_send_at or started) > self.connect_timeout

    def _timeout_error(self, seconds: float) -> errors.Timeout:
        return errors.Timeout(
            f"no answer from the exgen daemon at {self.address} for {seconds:g}s "
            "(is `exgen serve` running?)"
        )

    def next_wakeup(self, now: float) -> float:
        """Seconds until a timer of the core is due (at most MAX_WAKEUP_S)."""
        wake = MAX_WAKEUP_S
        if self.receipts.due_at is not None:
            wake = min(wake, self.receipts.due_at - now)
        for call in self.calls.values():
            if call.busy_until > now:
                wake = min(wake, call.busy_until - now)
        return max(wake, 0.0)

    def fail_all(self, error: BaseException, *, waiting_only: bool = False) -> None:
        """Every call (or every call waiting on the daemon) and request fails with this."""
        for call in self.calls.values():
            if not waiting_only or call.outstanding:
                call.fail(error)
                self.touched.add(call)
        for request in self.requests.values():
            request.fail(error)
            self.touched.add(request)

    def take_touched(self) -> set[Call | Request]:
        touched, self.touched = self.touched, set()
        return touched
