"""One call on a client connection, sans-IO: what :class:`Core` multiplexes.

A :class:`Call` is one ``iter_results`` / ``generate`` / ``stream``: its items (read
lazily from the caller's iterable, validated here), its window, what is out at the
daemon under its tag, what came back. A :class:`Request` is one request answered by
one reply (status, ping, cancelling another client). :class:`Result` is what a caller
gets for each item.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import msgpack

from exgen.client import errors
from exgen.client import protocol as P

SUBMIT_BATCH = 512  # items per submit frame: big enough to amortise, small enough to interleave
BUSY_BACKOFF_S = (0.05, 2.0)  # first and largest wait after a busy reply
CANCEL_BATCH = P.MAX_ITEMS_PER_SUBMIT  # ids per CANCEL frame
TAG_SEP = "."  # between a call's tag and a caller's id on the wire
# Errors that name items the daemon did not run: the items are sent again, not failed.
RETRYABLE_CODES = frozenset({P.E_BUSY, P.E_DRAINING})
# A call's submit priority (protocol.PRIORITIES): the daemon dispatches every waiting
# interactive item before any batch item.
Priority = Literal["interactive", "batch"]


class TokenLogprob(NamedTuple):
    """One generated token: its text, its log probability under the model, and the
    ``top_logprobs`` most likely tokens at that step as (text, logprob), best first."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


def _logprobs_from_wire(raw: Any) -> list[TokenLogprob] | None:
    if not isinstance(raw, list):
        return None
    return [
        TokenLogprob(str(token), float(lp), [(str(t), float(v)) for t, v in top])
        for token, lp, top in raw
    ]


@dataclass(slots=True)
class PromptEcho:
    """The prompt as the engine saw it (``Result.prompt``, where the params asked with
    ``echo`` or ``prompt_logprobs``): its token ids, their text, and per token
    ``[id, text, logprob, rank, [[alt id, alt text, logprob]...]]`` (the first token's
    logprob and rank None)."""

    ids: list[int]
    text: str
    logprobs: list[list[Any]] | None = None

    @classmethod
    def from_wire(cls, raw: Any) -> PromptEcho | None:
        if not isinstance(raw, dict):
            return None
        logprobs = raw.get("logprobs")
        return cls(
            [int(t) for t in raw.get("ids") or ()],
            str(raw.get("text") or ""),
            logprobs if isinstance(logprobs, list) else None,
        )


@dataclass(slots=True)
class Choice:
    """One of the ``n`` samples of a prompt (``Result.choices``)."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Result:
    """One prompt's outcome. ``error`` is set (and ``text`` empty) when it failed.

    ``model``: the name of the model the daemon serves (what wrote the text).
    ``latency_s``: from the item's last send to its result, on this side.
    ``logprobs``: per generated token, when the params asked (``logprobs`` /
    ``top_logprobs``). With ``n`` > 1, ``choices`` holds every sample (``text``,
    ``finish_reason`` and ``logprobs`` are the first one's; ``completion_tokens``
    counts all); with n = 1 it is empty. ``cached_tokens``: the leading prompt tokens
    the worker's prefix cache gave (0: none, or an engine without one).
    """

    id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    slot: int | None = None
    error: errors.RequestFailed | None = None
    latency_s: float = 0.0
    model: str | None = None
    logprobs: list[TokenLogprob] | None = None
    choices: list[Choice] = field(default_factory=list)
    prompt: PromptEcho | None = None
    cached_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> Result:
        if self.error is not None:
            raise self.error
        return self

    @classmethod
    def from_wire(
        cls,
        body: Mapping[str, Any],
        latency_s: float = 0.0,
        item_id: str | None = None,
        model: str | None = None,
    ) -> Result:
        if item_id is None:
            item_id = str(body.get("id", ""))
        err = body.get("error")
        result = cls(
            item_id,
            str(body.get("text") or ""),
            body.get("finish_reason"),
            int(body.get("prompt_tokens") or 0),
            int(body.get("completion_tokens") or 0),
            body.get("slot"),
            errors.error_from_wire(err, item_id) if isinstance(err, dict) else None,
            latency_s,
            model,
        )
        if "logprobs" in body or "choices" in body:  # only where the params asked
            result.logprobs = _logprobs_from_wire(body.get("logprobs"))
            choices = body.get("choices")
            if isinstance(choices, list):
                result.choices = [
                    Choice(
                        i,
                        str(c.get("text") or ""),
                        c.get("finish_reason"),
                        int(c.get("completion_tokens") or 0),
                        _logprobs_from_wire(c.get("logprobs")),
                    )
                    for i, c in enumerate(choices)
                ]
        if "prompt" in body:
            result.prompt = PromptEcho.from_wire(body["prompt"])
        if "cached_tokens" in body:
            result.cached_tokens = int(body.get("cached_tokens") or 0)
        return result


def local_error(item_id: str, exc: errors.RequestFailed) -> Result:
    """A Result for an item that failed on this side (it was never sent)."""
    exc.item_id = item_id
    return Result(item_id, "", P.FINISH_ERROR, error=exc)


class StreamText(str):
    """A stream's text chunk: a str, with the token counts the engine had reached when
    it wrote it (zero from a router that does not send them)."""

    completion_tokens: int
    prompt_tokens: int

    @classmethod
    def of(cls, row: list[Any]) -> StreamText:
        """From a CHUNKS row: [id, text, completion_tokens?, prompt_tokens?]."""
        counts = [c if type(c) is int else 0 for c in row[2:4]]
        return cls.counted(row[1], *(*counts, 0, 0)[:2])

    @classmethod
    def counted(cls, text: str, completion_tokens: int, prompt_tokens: int) -> StreamText:
        out = cls(text)
        out.completion_tokens, out.prompt_tokens = completion_tokens, prompt_tokens
        return out


class Place:
    """An ordered call's item in input order; holds its result once it came."""

    __slots__ = ("result",)

    def __init__(self, result: Result | None = None) -> None:
        self.result = result


def row_encoder() -> Callable[[Any], bytes]:
    """msgpack bytes of one item, the same bytes ``msgpack.packb`` writes: msgspec's
    encoder where the daemon's extra installed it (about half the cost), else a
    packer of msgpack's own. One per call: neither is shared between threads."""
    packer = msgpack.Packer(use_bin_type=True)
    try:
        import msgspec
    except ImportError:
        return packer.pack
    encode = msgspec.msgpack.Encoder().encode

    def encode_row(wire: Any) -> bytes:
        try:
            return encode(wire)
        except (TypeError, msgspec.EncodeError):  # a type msgspec leaves to msgpack
            return packer.pack(wire)

    return encode_row


@dataclass(slots=True)
class _Submit:
    """A submit frame the daemon has not yet answered (ACCEPTED or ERROR)."""

    req: str
    call: Call
    order: int  # frames leave in the order of these numbers (Core.counter)
    ids: list[str]


@dataclass(slots=True)
class Outgoing:
    """Frames for the shell to send; ``submit`` is set for a submit frame."""

    frames: list[bytes]
    submit: _Submit | None = None


class Call:
    """One iter_results / generate / stream call: its items, window and results."""

    def __init__(
        self,
        tag: str,
        items: Iterable[Mapping[str, Any] | Result],
        params: Mapping[str, Any],
        *,
        window: int,
        stream: bool = False,
        ordered: bool = False,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
    ) -> None:
        if not isinstance(window, int) or window < 1:
            raise errors.BadRequest(f"window must be a whole number >= 1, got {window!r}")
        if priority not in P.PRIORITIES:
            raise errors.BadRequest(
                f"priority must be one of {', '.join(P.PRIORITIES)}, not {priority!r}",
                field="priority",
            )
        try:
            self.defaults = P.validate_params(dict(params), "params") if params else {}
        except P.ValidationError as exc:
            raise errors.from_validation(exc) from None
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 < timeout_s <= P.MAX_TIMEOUT_S
        ):
            raise errors.BadRequest(
                f"timeout_s must be a number of seconds in (0, {P.MAX_TIMEOUT_S:g}]",
                field="timeout_s",
            )
        self.tag = tag
        self.prefix = tag + TAG_SEP
        try:
            self.source: Iterator[Mapping[str, Any] | Result] = iter(items)
        except TypeError:
            raise errors.BadRequest(
                f"items must be an iterable of maps, not {type(items).__name__}", field="items"
            ) from None
        self.timeout_s = timeout_s
        self.priority = priority
        self.window = window
        # Refill the window in large submits, not one per handful of results: every
        # submit costs a frame, a validation pass and an ACCEPTED reply at the router.
        self.low_water = min(SUBMIT_BATCH, max(1, window // 4))
        self.stream = stream
        self.ordered = ordered
        self.exhausted = False
        # The window's books hold nothing the cyclic GC tracks (str -> float, str ->
        # bytes): with a map and an object per item out, every young collection of
        # the caller's process scanned them and the window climbed into the old
        # generations, which then scanned it whole (a quarter of the client's CPU
        # per prompt at 8,192 items out).
        self.outstanding: dict[str, float] = {}  # wire id -> when it was last sent
        self.rows: dict[str, bytes] = {}  # wire id -> the item, encoded (resends reuse it)
        self.places: dict[str, Place] = {}  # an ordered call's wire id -> its place
        self.encode_row = row_encoder()
        # Every wire id taken from the source (no repeats): a map to None, not a set,
        # since a set is scanned entry by entry by every full collection.
        self.taken: dict[str, None] = {}
        self.ready: deque[Result] = deque()  # results to hand to the caller
        self.order: deque[Place] = deque()  # ordered calls: input order, not yet handed
        self.chunks: deque[StreamText] = deque()  # streamed text not yet handed
        self.streamed = ""  # a stream's text handed so far
        self.final: Result | None = None  # a stream's result, once it came (not failed)
        self.resend: deque[str] = deque()  # wire ids to send again (busy, reconnect)
        self.busy_until = 0.0
        self.busy_wait = BUSY_BACKOFF_S[0]
        self.error: BaseException | None = None  # raised to the caller at its next step

    @property
    def finished(self) -> bool:
        return (
            self.exhausted
            and not self.outstanding
            and not self.resend
            and not self.ready
            and not self.chunks
            and not self.order
        )

    @property
    def has_news(self) -> bool:
        """Something for the caller: a result, a chunk, an error, or the end."""
        return bool(self.ready or self.chunks or self.error is not None or self.finished)

    def take_text(self) -> list[str]:
        """A stream's new text: its chunks, then what the final result adds to them.

        Engines stream freely and settle the text at the end (a stop string may cut
        it), so the final text is the truth; chunks past a stop string are not taken
        back. A failed result becomes the call's error (raised after these texts); a
        good one is kept as ``final``.
        """
        texts: list[str] = list(self.chunks)
        self.chunks.clear()
        self.streamed += "".join(texts)
        while self.ready:
            result = self.ready.popleft()
            if result.error is not None:
                self.fail(result.error)
                continue
            self.final = result
            if result.text.startswith(self.streamed) and len(result.text) > len(self.streamed):
                rest = result.text[len(self.streamed) :]
                texts.append(
                    StreamText.counted(rest, result.completion_tokens, result.prompt_tokens)
                )
                self.streamed = result.text
        return texts

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            self.exhausted = True
            raise error

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    # --- sending ------------------------------------------------------------------

    def next_batch(self, now: float) -> list[str]:
        """The wire ids of this call's next submit (their items: ``rows``); empty when
        the window is full."""
        if now < self.busy_until or self.error is not None:
            return []
        batch: list[str] = []
        outstanding = self.outstanding
        while self.resend and len(batch) < SUBMIT_BATCH:
            again = self.resend.popleft()
            if again in outstanding:  # else answered meanwhile
                outstanding[again] = now
                batch.append(again)
        # An ordered call's window counts every item not yet handed to the caller.
        held = self.order if self.ordered else outstanding
        room = min(SUBMIT_BATCH - len(batch), self.window - len(held))
        if not batch and held and room < self.low_water:
            return []  # results free room a few at a time: wait for a full-size submit
        take, encode, rows, append = self._take_item, self.encode_row, self.rows, batch.append
        while room > 0 and not self.exhausted:
            wire = take()
            row = None
            if wire is not None:
                try:
                    row = encode(wire)
                except UnicodeEncodeError:
                    self._refuse_unencodable(wire)
            if wire is None or row is None:
                room = min(room, self.window - len(held))  # answered on this side: held too
                continue
            wire_id = wire["id"]
            rows[wire_id] = row
            outstanding[wire_id] = now
            if self.ordered:
                place = self.places[wire_id] = Place()
                self.order.append(place)
            append(wire_id)
            room -= 1
        return batch

    def _take_item(self) -> dict[str, Any] | None:
        """One item from the source, validated; a bad one becomes an error Result."""
        try:
            raw = next(self.source)
        except StopIteration:
            self.exhausted = True
            return None
        if type(raw) is not dict:  # the common case first: isinstance of an ABC is slow
            if isinstance(raw, Result):  # the caller's own answer, handed back in its place
                self._answer_locally(raw)
                return None
            if not isinstance(raw, Mapping):
                raise errors.BadRequest(
                    f"an item must be a map with prompt or messages, not {type(raw).__name__}",
                    field="item",
                )
        raw = dict(raw)
        own = raw.get("params")
        checked = None
        if own:
            raw["params"] = P.overlaid_params(self.defaults, own) if isinstance(own, dict) else own
        else:  # the common case: the call's defaults, validated once for every item
            raw["params"] = checked = self.defaults
        if self.timeout_s is not None and raw.get("timeout_s") is None:
            raw["timeout_s"] = self.timeout_s
        item_id = raw.get("id")
        try:
            item = P.validate_item(raw, "item", checked)
        except P.ValidationError as exc:
            if not isinstance(item_id, str) or not item_id:
                raise errors.from_validation(exc) from None
            self._answer_locally(local_error(item_id, errors.from_validation(exc, item_id)))
            return None
        wire = item.to_wire()
        wire_id = wire["id"] = self.prefix + item.id
        if wire_id in self.taken:
            raise errors.BadRequest(f"duplicate id {item.id!r}", field="id", item_id=item.id)
        self.taken[wire_id] = None
        return wire

    def _answer_locally(self, result: Result) -> None:
        if self.ordered:
            self.order.append(Place(result))
            self._emit_in_order()
        else:
            self.ready.append(result)

    def queue_resend(self, wire_ids: Iterable[str]) -> None:
        """Send outstanding items again, each once (a submit refuses repeats)."""
        queued = set(self.resend)
        outstanding = self.outstanding
        for wire_id in wire_ids:
            if wire_id in outstanding and wire_id not in queued:
                self.resend.append(wire_id)
                queued.add(wire_id)

    def _refuse_unencodable(self, wire: dict[str, Any]) -> None:
        """An item msgpack cannot encode (a lone surrogate), answered as a bad request."""
        wire_id = wire["id"]
        where = unencodable_field(wire) or "item"
        message = f"{where} holds a character that cannot be encoded as UTF-8 (a lone surrogate?)"
        body = P.result_error(wire_id, P.E_BAD_REQUEST, message, where)
        self._answer_locally(Result.from_wire(body, 0.0, wire_id[len(self.prefix) :]))

    def forget_outstanding(self) -> None:
        """Nothing is owed any more (the call ended): drop what was out, and resends."""
        self.outstanding.clear()
        self.rows.clear()
        self.places.clear()
        self.resend.clear()

    # --- receiving ----------------------------------------------------------------

    def on_results(
        self, results: Iterable[Mapping[str, Any]], now: float, model: str | None
    ) -> None:
        """Many results at once: on_result with its lookups hoisted (the hot path)."""
        if self.ordered:
            for res in results:
                self.on_result(str(res.get("id")), res, now, model)
            return
        pop, rows, append, cut, make = (
            self.outstanding.pop,
            self.rows,
            self.ready.append,
            len(self.prefix),
            Result.from_wire,
        )
        for res in results:
            wire_id = res.get("id")
            if not isinstance(wire_id, str):
                continue
            sent_at = pop(wire_id, None)
            if sent_at is not None:  # else answered already (a redelivery, a resend answered twice)
                del rows[wire_id]
                append(make(res, now - sent_at, wire_id[cut:], model))

    def on_result(
        self, wire_id: str, body: Mapping[str, Any], now: float, model: str | None
    ) -> None:
        sent_at = self.outstanding.pop(wire_id, None)
        if sent_at is None:
            return  # answered already (a redelivery, or a resend answered twice)
        del self.rows[wire_id]
        result = Result.from_wire(body, now - sent_at, wire_id[len(self.prefix) :], model)
        place = self.places.pop(wire_id, None)
        if place is None:
            self.ready.append(result)
        else:
            place.result = result
            self._emit_in_order()

    def _answer(self, wire_id: str, body: Mapping[str, Any], now: float) -> None:
        self.on_result(wire_id, body, now, None)

    def _emit_in_order(self) -> None:
        order = self.order
        while order and order[0].result is not None:
            result = order.popleft().result
            assert result is not None
            self.ready.append(result)

    def on_item_error(self, wire_ids: list[str], body: Mapping[str, Any], now: float) -> None:
        code = str(body.get("code"))
        if code in RETRYABLE_CODES:
            # Not accepted (busy), or handed back unstarted by a daemon that is
            # stopping (draining): send the same items again after a growing pause,
            # to this daemon or to the one that replaces it.
            self.queue_resend(wire_ids)
            self.busy_until = now + self.busy_wait
            self.busy_wait = min(self.busy_wait * 2, BUSY_BACKOFF_S[1])
            return
        err = {"code": code, "message": body.get("message", ""), "field": body.get("field")}
        for wire_id in wire_ids:
            self._answer(wire_id, {**P.result_error(wire_id, code, ""), "error": err}, now)

    def cancel_frames(self) -> list[Outgoing]:
        """CANCEL frames for every item this call still has at the daemon."""
        ids = list(self.outstanding)
        return [
            Outgoing(P.pack(P.CANCEL, {"ids": ids[i : i + CANCEL_BATCH]}))
            for i in range(0, len(ids), CANCEL_BATCH)
        ]


class Request:
    """One request answered by one reply (status, ping, another client's cancel)."""

    __slots__ = ("error", "expect", "order", "reply", "req", "sent_at", "timeout")

    def __init__(
        self, req: str, order: int, expect: bytes, sent_at: float, timeout: float | None = None
    ) -> None:
        self.req = req
        self.timeout = timeout
        self.order = order  # frames leave in the order of these numbers (Core.counter)
        self.expect = expect
        self.sent_at = sent_at
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    @property
    def has_news(self) -> bool:
        return self.done

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.error = error


def unencodable_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string msgpack cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "item"
        return None
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = (
            (f"{path}.{k}" if path else str(k), v) for k, v in value.items()
        )
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, inner in items:
        found = unencodable_field(inner, where)
        if found is not None:
            return found
    return None
