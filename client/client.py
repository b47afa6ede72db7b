"""The client library: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both speak to the router over one DEALER socket and share one sans-IO core,
:class:`_Session`, that owns the bookkeeping: which items are outstanding, the send
window, busy back-off, resending after a reconnect, and duplicate suppression.

Flow control is credit-like: at most ``window`` items are outstanding at once, so a
100,000-line iterator is sent lazily and neither side's memory grows with the file.
A ``busy`` reply (the router's queue is full) makes the client wait and resend.

If the daemon stops answering pings (it was restarted, say), the client reconnects
with back-off and resends every item that was sent but not answered, with the same
ids; a result for an id already delivered is dropped, so each id is yielded once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.keys import CurveKeys

logger = logging.getLogger(__name__)

SUBMIT_BATCH = 512  # items per submit frame: big enough to amortise, small enough to interleave
PING_INTERVAL_S = 1.0  # of silence, while results are owed (docs/protocol.md)
ACK_EVERY = 64  # RESULTS messages per acknowledgement, at most
ACK_DELAY_S = 0.2  # an acknowledgement waits at most this long
BUSY_BACKOFF_S = (0.05, 2.0)  # first and largest wait after a busy reply
# Errors that name items the daemon did not run: the items are sent again, not failed.
RETRYABLE_CODES = frozenset({P.E_BUSY, P.E_DRAINING})
SYSTEMD_SOCKET = Path("/run/exgen/exgen.sock")


def default_address() -> str:
    """$EXGEN_ADDRESS; else the systemd service's socket if present; else a per-user one."""
    env = os.environ.get("EXGEN_ADDRESS")
    if env:
        return env
    if SYSTEMD_SOCKET.exists():
        return f"ipc://{SYSTEMD_SOCKET}"
    return user_address()


def user_address() -> str:
    """The per-user ipc socket: ``$XDG_RUNTIME_DIR/exgen/exgen.sock`` or under /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "exgen" if runtime else Path(f"/tmp/exgen-{os.getuid()}")
    return f"ipc://{base / 'exgen.sock'}"


@dataclass(slots=True)
class Result:
    """One prompt's outcome. ``error`` is set (and ``text`` empty) when it failed."""

    id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    slot: int | None = None
    error: errors.RequestFailed | None = None
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> Result:
        if self.error is not None:
            raise self.error
        return self

    @classmethod
    def from_wire(cls, body: Mapping[str, Any], latency_s: float = 0.0) -> Result:
        item_id = str(body.get("id", ""))
        err = body.get("error")
        return cls(
            id=item_id,
            text=str(body.get("text") or ""),
            finish_reason=body.get("finish_reason"),
            prompt_tokens=int(body.get("prompt_tokens") or 0),
            completion_tokens=int(body.get("completion_tokens") or 0),
            slot=body.get("slot"),
            error=errors.error_from_wire(err, item_id) if isinstance(err, dict) else None,
            latency_s=latency_s,
        )


def _as_item(prompt: str | Mapping[str, Any], item_id: str) -> dict[str, Any]:
    """A str prompt, or a mapping with prompt/messages (and maybe id, params)."""
    if isinstance(prompt, str):
        return {"id": item_id, "prompt": prompt}
    item = dict(prompt)
    item.setdefault("id", item_id)
    return item


def workers_ready(status: Mapping[str, Any], count: int | None = None) -> bool:
    """Whether a status document shows ``count`` ready workers (default: all slots)."""
    workers = status.get("workers") or []
    ready = sum(1 for w in workers if w.get("state") == "ready")
    return bool(workers) and ready >= (count or len(workers))


def _stream_item(prompt: str | list[dict[str, str]]) -> dict[str, Any]:
    """The one item of a stream() call: chat messages or a plain prompt."""
    if isinstance(prompt, list):
        return {"id": "0", "messages": prompt}
    return {"id": "0", "prompt": prompt}


def _parse(frames: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    """A reply from the daemon; frames of another protocol are ProtocolMismatch."""
    try:
        return P.unpack(frames)
    except P.FrameError as exc:
        raise errors.ProtocolMismatch(str(exc)) from None


def _stream_tail(result: Result, sent: str) -> str:
    """What the final result adds to the chunks already streamed.

    Engines stream freely and settle the text at the end (a stop string may cut it),
    so the final text is the truth; chunks past a stop string are not taken back.
    """
    result.raise_for_error()
    return result.text[len(sent) :] if result.text.startswith(sent) else ""


@dataclass(slots=True)
class _Outstanding:
    wire: dict[str, Any]
    sent_at: float


class _Session:
    """Sans-IO state of one iter_results call: what to send next, what came back."""

    def __init__(
        self,
        items: Iterable[Mapping[str, Any]],
        defaults: dict[str, Any],
        window: int,
        stream: bool,
        receipts: _Receipts | None = None,
    ) -> None:
        self.source = iter(items)
        self.defaults = P.validate_params(defaults, "params") if defaults else {}
        self.window = window
        # Refill the window in large submits, not one per handful of results: every
        # submit costs a frame, a validation pass and an ACCEPTED reply at the router.
        self.low_water = min(SUBMIT_BATCH, max(1, window // 4))
        self.stream = stream
        self.exhausted = False
        self.outstanding: dict[str, _Outstanding] = {}
        self.delivered: set[str] = set()
        self.ready: deque[Result] = deque()  # results to hand to the caller
        self.chunks: deque[tuple[str, str]] = deque()
        self.resend: deque[dict[str, Any]] = deque()  # busy or reconnect: send again
        self.busy_until = 0.0
        self.busy_wait = BUSY_BACKOFF_S[0]
        self.instance: str | None = None  # the daemon run we are talking to
        # Submits not yet acknowledged, and pings not yet answered, by request id. The
        # router answers in order, so a pong for a ping sent after a submit that got
        # no ACCEPTED means that submit was lost (sent to a daemon that then died).
        self.unacked: dict[str, tuple[float, list[str]]] = {}
        self.pings: dict[str, float] = {}
        self.ping_counter = itertools.count()
        # Per connection, not per call: RESULTS are numbered per client session.
        self.delivery = receipts if receipts is not None else _Receipts()

    @property
    def finished(self) -> bool:
        return (
            self.exhausted
            and not self.outstanding
            and not self.resend
            and not self.ready
            and not self.chunks
        )

    def next_submit(self, now: float) -> dict[str, Any] | None:
        """The next submit body to send, or None when the window is full or all is sent."""
        if now < self.busy_until:
            return None
        batch: list[dict[str, Any]] = []
        while self.resend and len(batch) < SUBMIT_BATCH:
            batch.append(self.resend.popleft())
        room = self.window - len(self.outstanding)
        if not batch and self.outstanding and room < self.low_water:
            return None  # results free room a few at a time: wait for a full-size submit
        while not self.exhausted and len(batch) < min(SUBMIT_BATCH, room):
            wire = self._next_valid_item()
            if wire is not None:
                batch.append(wire)
                self.outstanding[wire["id"]] = _Outstanding(wire, now)
        if not batch:
            return None
        for wire in batch:
            self.outstanding[wire["id"]].sent_at = now
        req = uuid.uuid4().hex
        self.unacked[req] = (now, [wire["id"] for wire in batch])
        return {"req": req, "items": batch, "stream": self.stream}

    def unsent(self, body: dict[str, Any]) -> None:
        """A submit that could not leave (no daemon connected): its items go out again."""
        self.unacked.pop(body["req"], None)
        self.resend.extendleft(reversed(body["items"]))

    def ping_body(self, now: float) -> dict[str, Any]:
        req = f"ping-{next(self.ping_counter)}"
        self.pings[req] = now
        return {"req": req}

    def _on_pong(self, body: dict[str, Any]) -> None:
        self._note_session(body.get("session"))
        if not body.get("known", True) and self.outstanding:
            self._session_lost("the daemon no longer knows this client's items")
        self.delivery.check_gap(body.get("seq"), body.get("acked"))
        sent_at = self.pings.pop(str(body.get("req")), None)
        if sent_at is None:
            return
        lost = [req for req, (at, _) in self.unacked.items() if at <= sent_at]
        for req in lost:
            ids = self.unacked.pop(req)[1]
            logger.warning("a submit of %d items got no answer; sending it again", len(ids))
            self._queue_resend(ids)

    def _next_valid_item(self) -> dict[str, Any] | None:
        """Take one item from the source; a bad one becomes an error Result at once."""
        try:
            raw = next(self.source)
        except StopIteration:
            self.exhausted = True
            return None
        raw = dict(raw)
        own = raw.get("params")
        checked = None
        if own:
            raw["params"] = {**self.defaults, **own} if isinstance(own, dict) else own
        else:  # the common case: the call's defaults, validated once for every item
            raw["params"] = checked = self.defaults
        item_id = raw.get("id")
        try:
            item = P.validate_item(raw, "item", checked)
        except P.ValidationError as exc:
            if not isinstance(item_id, str) or not item_id:
                raise errors.BadRequest(exc.message, field=exc.field) from None
            self._deliver(P.result_error(item_id, P.E_BAD_REQUEST, exc.message, exc.field), 0.0)
            return None
        if item.id in self.outstanding or item.id in self.delivered:
            raise errors.BadRequest(f"duplicate id {item.id!r}", field="id", item_id=item.id)
        return item.to_wire()

    def on_message(self, command: bytes, body: dict[str, Any], now: float) -> None:
        self._note_instance(body.get("instance"))
        if command == P.RESULTS:
            self._note_session(body.get("session"))
            self.delivery.received(body.get("seq"), now)
            for res in body.get("results", ()):
                pending = self.outstanding.pop(str(res.get("id")), None)
                if pending is not None:  # else a duplicate after a resend: drop it
                    self._deliver(res, now - pending.sent_at)
        elif command == P.CHUNKS:
            for item_id, text in body.get("chunks", ()):
                if item_id in self.outstanding:
                    self.chunks.append((item_id, text))
        elif command == P.ERROR:
            self._on_error(body, now)
        elif command == P.ACCEPTED:
            self._note_session(body.get("session"))
            self.unacked.pop(str(body.get("req")), None)
            self.busy_wait = BUSY_BACKOFF_S[0]
        elif command == P.PONG:
            self._on_pong(body)

    def _on_error(self, body: dict[str, Any], now: float) -> None:
        self.unacked.pop(str(body.get("req")), None)
        code = body.get("code")
        items = body.get("items") or []
        if code in RETRYABLE_CODES and items:
            # Not accepted (busy), or handed back unstarted by a daemon that is
            # stopping (draining): send the same items again after a growing pause,
            # to this daemon or to the one that replaces it.
            self._queue_resend(items)
            self.busy_until = now + self.busy_wait
            self.busy_wait = min(self.busy_wait * 2, BUSY_BACKOFF_S[1])
            return
        # A request-level error that is not retryable fails every item it named.
        for item_id in items:
            pending = self.outstanding.pop(item_id, None)
            if pending is not None:
                err = {"code": code, "message": body.get("message", ""), "field": body.get("field")}
                self._deliver({**P.result_error(item_id, str(code), ""), "error": err}, 0.0)
        if not items:
            raise errors.error_from_wire(body)

    def _deliver(self, res: Mapping[str, Any], latency: float) -> None:
        item_id = str(res.get("id"))
        if item_id in self.delivered:
            return
        self.delivered.add(item_id)
        self.ready.append(Result.from_wire(res, latency))

    def _note_instance(self, instance: Any) -> None:
        """A new daemon run has lost what the old one accepted: send it all again."""
        if not isinstance(instance, str):
            return
        if self.instance is not None and instance != self.instance:
            logger.warning("the exgen daemon restarted; resending %d items", len(self.outstanding))
            self._queue_resend(list(self.outstanding))
        self.instance = instance

    def _note_session(self, session: Any) -> None:
        """A new session means the daemon forgot this client (its lease ran out while
        the client was away): what was accepted and not answered must go again."""
        if not isinstance(session, int) or session == self.delivery.session:
            return
        if self.delivery.session is not None:
            self._session_lost("the daemon started a new session for this client")
        self.delivery.new_session(session)

    def _session_lost(self, why: str) -> None:
        logger.warning("%s; resending %d items", why, len(self.outstanding))
        self._queue_resend(list(self.outstanding))

    def ack_body(self, now: float, force: bool = False) -> dict[str, Any] | None:
        """An ACK to send now, if one is due (``force``: whatever is unacknowledged)."""
        return self.delivery.ack_body(now, force)

    def _queue_resend(self, ids: Iterable[str]) -> None:
        """Queue outstanding items to send again, each once (a submit refuses repeats)."""
        queued = {w["id"] for w in self.resend}
        for item_id in ids:
            pending = self.outstanding.get(item_id)
            if pending is not None and item_id not in queued:
                self.resend.append(pending.wire)
                queued.add(item_id)


class _Receipts:
    """Which RESULTS messages of this session arrived: what to acknowledge, and whether
    some were lost on the link (a PONG names a seq we have not seen)."""

    def __init__(self) -> None:
        self.session: int | None = None
        self.contiguous = 0  # every seq up to this arrived
        self.ahead: set[int] = set()
        self.acked = 0
        self.first_unacked_at: float | None = None
        self.resend = False

    def new_session(self, session: int) -> None:
        self.__init__()  # type: ignore[misc]
        self.session = session

    def received(self, seq: Any, now: float) -> None:
        if not isinstance(seq, int) or seq <= self.contiguous:
            return  # a redelivery of what we have
        self.ahead.add(seq)
        while self.contiguous + 1 in self.ahead:
            self.contiguous += 1
            self.ahead.discard(self.contiguous)
        if self.first_unacked_at is None:
            self.first_unacked_at = now

    def check_gap(self, seq: Any, acked: Any) -> None:
        if isinstance(seq, int) and seq > self.contiguous:
            self.resend = True  # sent before this PONG, on the same pipe: lost
        if isinstance(acked, int) and acked < self.contiguous:
            self.acked = min(self.acked, acked)  # the router lacks some ACK: send it now
            self.first_unacked_at = -ACK_DELAY_S

    def ack_body(self, now: float, force: bool = False) -> dict[str, Any] | None:
        if self.session is None:
            return None
        due = self.contiguous > self.acked and (
            force
            or self.contiguous - self.acked >= ACK_EVERY
            or now - (now if self.first_unacked_at is None else self.first_unacked_at)
            >= ACK_DELAY_S
        )
        if not (due or self.resend):
            return None
        body = {"session": self.session, "seq": self.contiguous, "resend": self.resend}
        self.acked, self.resend, self.first_unacked_at = self.contiguous, False, None
        return body


class _Base:
    def __init__(
        self, address: str | None, timeout: float | None, window: int, curve: CurveKeys | None
    ) -> None:
        self.address = address or default_address()
        self.timeout = timeout
        self.window = window
        # CURVE (a daemon listening beyond this machine): given, else from the environment.
        self.curve = curve if curve is not None else CurveKeys.from_env()
        # A fixed identity, so that replies still find us after ZMQ reconnects.
        self.identity = f"c-{uuid.uuid4().hex}".encode()
        self._receipts = _Receipts()
        self._req_counter = itertools.count()

    def _configure(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.address)

    # Sends never block: a DEALER with no daemon connected (down, restarting, or one
    # that refused our CURVE keys) would otherwise wait forever, past any timeout.

    def _check_alive(self, last_heard: float, now: float) -> None:
        if self.timeout is not None and now - last_heard > self.timeout:
            raise errors.Timeout(
                f"no answer from the exgen daemon at {self.address} for {self.timeout:g}s "
                "(is `exgen serve` running?)"
            )


class Client(_Base):
    """Blocking client. Not thread-safe: one thread per Client.

    ``timeout``: how long the daemon may stay silent (it answers pings every
    couple of seconds while work is in progress) before :class:`errors.Timeout`.
    ``curve``: keys for a daemon that requires CURVE (:class:`exgen.client.keys.CurveKeys`;
    default: from $EXGEN_SERVER_KEY and $EXGEN_CLIENT_KEY when set). A daemon that
    does not accept the keys never answers: the symptom is :class:`errors.Timeout`.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        window: int = 4096,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(address, timeout, window, curve)
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._configure(self._sock)

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- public API ---------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Mapping[str, Any]], **params: Any) -> list[Result]:
        """Results in input order. ``prompts``: strings, or maps with prompt/messages."""
        items = [_as_item(p, str(i)) for i, p in enumerate(prompts)]
        by_id = {r.id: r for r in self.iter_results(items, **params)}
        return [by_id[item["id"]] for item in items]

    def iter_results(self, items: Iterable[Mapping[str, Any]], **params: Any) -> Iterator[Result]:
        """Each Result as soon as it completes (any order); items are sent lazily."""
        session = _Session(items, params, self.window, False, self._receipts)
        for kind, value in self._drive(session):
            if kind == "result":
                yield value

    def stream(self, prompt: str | list[dict[str, str]], **params: Any) -> Iterator[str]:
        """Text chunks of one generation as they are produced."""
        session = _Session([_stream_item(prompt)], params, 1, True, self._receipts)
        sent = ""
        for kind, value in self._drive(session):
            if kind == "chunk":
                sent += value[1]
                yield value[1]
            else:
                yield _stream_tail(value, sent)

    def status(self) -> dict[str, Any]:
        return self._request(P.STATUS, {}, P.STATUS_REPLY)

    def ping(self) -> dict[str, Any]:
        return self._request(P.PING, {}, P.PONG)

    def wait_ready(self, timeout: float = 300.0, count: int | None = None) -> dict[str, Any]:
        """Block until ``count`` workers (default: every slot) are ready; the status then.

        For scripts that start ``exgen serve`` and then submit: the daemon may not be
        listening yet, and models take a while to load. Raises :class:`errors.Timeout`.
        """
        deadline = time.monotonic() + timeout
        saved, self.timeout = self.timeout, 1.0  # short fuses, retried until the deadline
        try:
            while True:
                try:
                    status = self.status()
                except errors.ConnectionFailed:
                    status = {}
                if workers_ready(status, count):
                    return status
                if time.monotonic() >= deadline:
                    raise errors.Timeout(
                        f"exgen workers at {self.address} not ready in {timeout:g}s"
                    )
                time.sleep(0.2)
        finally:
            self.timeout = saved

    def cancel(self, ids: Iterable[str]) -> None:
        """Best effort: a cancel that cannot be sent now is dropped."""
        self._send(P.pack(P.CANCEL, {"ids": list(ids)}))

    # --- internals ----------------------------------------------------------------

    def _send(self, frames: list[bytes]) -> bool:
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _request(self, command: bytes, body: dict[str, Any], expect: bytes) -> dict[str, Any]:
        req = f"q{next(self._req_counter)}"
        frames = P.pack(command, {**body, "req": req})
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else 1e9)
        while not self._send(frames):
            self._check_alive(deadline - (self.timeout or 0.0), time.monotonic())
            time.sleep(0.05)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(remaining * 1000):
                self._check_alive(0.0, time.monotonic())
                continue
            got, reply = _parse(self._sock.recv_multipart())
            if reply.get("req") != req:
                continue  # a late reply to something earlier
            if got == P.ERROR:
                raise errors.error_from_wire(reply)
            if got == expect:
                return reply

    def _drive(self, session: _Session) -> Iterator[tuple[str, Any]]:
        last_heard = time.monotonic()
        last_ping = 0.0
        while not session.finished:
            now = time.monotonic()
            body = session.next_submit(now)
            while body is not None:
                if not self._send(P.pack(P.SUBMIT, body)):
                    session.unsent(body)
                    break
                body = session.next_submit(now)
            while session.chunks:
                yield "chunk", session.chunks.popleft()
            while session.ready:
                yield "result", session.ready.popleft()
            if session.finished:
                self._send_ack(session.ack_body(time.monotonic(), force=True))
                return
            heard = False
            if self._sock.poll(min(200, ACK_DELAY_S * 1000)):
                while self._sock.poll(0):
                    self._receive_one(session)
                last_heard = time.monotonic()
                heard = True
            self._send_ack(session.ack_body(time.monotonic()))
            if not heard and session.outstanding:
                now = time.monotonic()
                self._check_alive(last_heard, now)
                if now - last_ping > PING_INTERVAL_S:
                    self._send(P.pack(P.PING, session.ping_body(now)))
                    last_ping = now

    def _send_ack(self, ack: dict[str, Any] | None) -> None:
        if ack is not None:
            self._send(P.pack(P.ACK, ack))

    def _receive_one(self, session: _Session) -> None:
        command, body = _parse(self._sock.recv_multipart())
        session.on_message(command, body, time.monotonic())


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`; same methods, awaited."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        window: int = 4096,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(address, timeout, window, curve)
        self._ctx: zmq.asyncio.Context = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._configure(self._sock)
        self._lock = asyncio.Lock()  # one conversation at a time on the socket

    def close(self) -> None:
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def generate(
        self, prompts: Sequence[str | Mapping[str, Any]], **params: Any
    ) -> list[Result]:
        items = [_as_item(p, str(i)) for i, p in enumerate(prompts)]
        by_id = {r.id: r async for r in self.iter_results(items, **params)}
        return [by_id[item["id"]] for item in items]

    async def iter_results(
        self, items: Iterable[Mapping[str, Any]], **params: Any
    ) -> AsyncIterator[Result]:
        session = _Session(items, params, self.window, False, self._receipts)
        async with self._lock:
            async for kind, value in self._drive(session):
                if kind == "result":
                    yield value

    async def stream(self, prompt: str | list[dict[str, str]], **params: Any) -> AsyncIterator[str]:
        session = _Session([_stream_item(prompt)], params, 1, True, self._receipts)
        sent = ""
        async with self._lock:
            async for kind, value in self._drive(session):
                if kind == "chunk":
                    sent += value[1]
                    yield value[1]
                else:
                    yield _stream_tail(value, sent)

    async def status(self) -> dict[str, Any]:
        return await self._request(P.STATUS, {}, P.STATUS_REPLY)

    async def ping(self) -> dict[str, Any]:
        return await self._request(P.PING, {}, P.PONG)

    async def cancel(self, ids: Iterable[str]) -> None:
        """Best effort: a cancel that cannot be sent now is dropped."""
        await self._send(P.pack(P.CANCEL, {"ids": list(ids)}))

    async def _send_ack(self, ack: dict[str, Any] | None) -> None:
        if ack is not None:
            await self._send(P.pack(P.ACK, ack))

    async def _send(self, frames: list[bytes]) -> bool:
        try:
            await self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    async def _request(self, command: bytes, body: dict[str, Any], expect: bytes) -> dict[str, Any]:
        req = f"q{next(self._req_counter)}"
        frames = P.pack(command, {**body, "req": req})
        async with self._lock:
            started = time.monotonic()
            while not await self._send(frames):
                self._check_alive(started, time.monotonic())
                await asyncio.sleep(0.05)
            while True:
                if not await self._sock.poll(200):
                    self._check_alive(started, time.monotonic())
                    continue
                got, reply = _parse(await self._sock.recv_multipart())
                if reply.get("req") != req:
                    continue
                if got == P.ERROR:
                    raise errors.error_from_wire(reply)
                if got == expect:
                    return reply

    async def _drive(self, session: _Session) -> AsyncIterator[tuple[str, Any]]:
        last_heard = time.monotonic()
        last_ping = 0.0
        while not session.finished:
            now = time.monotonic()
            body = session.next_submit(now)
            while body is not None:
                if not await self._send(P.pack(P.SUBMIT, body)):
                    session.unsent(body)
                    break
                body = session.next_submit(now)
            while session.chunks:
                yield "chunk", session.chunks.popleft()
            while session.ready:
                yield "result", session.ready.popleft()
            if session.finished:
                await self._send_ack(session.ack_body(time.monotonic(), force=True))
                return
            heard = False
            if await self._sock.poll(min(200, ACK_DELAY_S * 1000)):
                while await self._sock.poll(0):
                    command, reply = _parse(await self._sock.recv_multipart())
                    session.on_message(command, reply, time.monotonic())
                last_heard = time.monotonic()
                heard = True
            await self._send_ack(session.ack_body(time.monotonic()))
            if not heard and session.outstanding:
                now = time.monotonic()
                self._check_alive(last_heard, now)
                if now - last_ping > PING_INTERVAL_S:
                    await self._send(P.pack(P.PING, session.ping_body(now)))
                    last_ping = now
