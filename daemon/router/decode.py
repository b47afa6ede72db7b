"""Decoding a client's frame at a bounded cost, before the protocol's checks.

A frame can be cheap to send and costly to decode: a few MiB of msgpack holding
millions of tiny elements where a string belongs turned into millions of Python
objects and froze the router loop for seconds. Here every client body is decoded
against a typed shape (msgspec): a container is accepted only where the protocol
has one, with a bounded length, and anything else is refused at its first wrong
element, before it is built. A submit is decoded in two steps — the envelope, whose
``items`` stay undecoded (``msgspec.Raw``), then each item on its own — so one bad
item is rejected alone (``Submit.rejected``) and the others are served.

After the shape, the same checks as every other caller's: ``protocol.check_envelope``
and ``protocol.add_item`` (ranges, lengths, names).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from exgen.client import protocol as P
from exgen.daemon.router import nesting

Scalar = str | int | float | bool | None

SMALL_BODY_BYTES = 64 * 1024  # PING, STATUS, HELLO, ACK: a few scalars


class _Envelope(msgspec.Struct):
    req: Scalar = None
    items: Annotated[list[msgspec.Raw], Meta(max_length=P.MAX_ITEMS_PER_SUBMIT)] | Scalar = None
    stream: Scalar = False
    priority: Scalar = P.PRIORITIES[0]


_Message = Annotated[dict[str, Scalar], Meta(max_length=16)]
# A param's string is at most a JSON Schema's text (the longest a param may be): the
# schema crosses the wire as text, so its nesting is never decoded here, and the
# protocol's check parses it with a depth limit.
_ParamScalar = Annotated[str, Meta(max_length=P.MAX_SCHEMA_CHARS)] | int | float | bool | None
_Params = Annotated[
    dict[str, _ParamScalar | Annotated[list[Scalar], Meta(max_length=P.MAX_STOP_STRINGS)]],
    Meta(max_length=32),
]


class _Item(msgspec.Struct, forbid_unknown_fields=True):
    # None: absent (as a map's .get would say): the protocol's checks take them as is.
    id: Scalar = None
    prompt: Annotated[list[int], Meta(max_length=P.MAX_PROMPT_IDS)] | Scalar = None
    messages: Annotated[list[_Message], Meta(max_length=P.MAX_MESSAGES)] | Scalar = None
    params: _Params | Scalar = None
    timeout_s: Scalar = None
    model: Scalar = None


class _ReqOnly(msgspec.Struct):
    req: Scalar = None  # every other field skipped, not built


class _ItemId(msgspec.Struct):
    id: Scalar = None  # every other field skipped, not built


class _Cancel(msgspec.Struct):
    req: Scalar = None
    ids: Annotated[list[Scalar], Meta(max_length=P.MAX_ITEMS_PER_SUBMIT)] | Scalar | UnsetType = (
        UNSET
    )
    all: Scalar = False
    client: Scalar = None
    clients: Scalar = None


_SMALL = Annotated[dict[str, Scalar], Meta(max_length=16)]

_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)
_ITEM = msgspec.msgpack.Decoder(_Item)
_ITEM_ID = msgspec.msgpack.Decoder(_ItemId)
_ENCODE = msgspec.msgpack.Encoder().encode
_REQ_ONLY = msgspec.msgpack.Decoder(_ReqOnly)
_CANCEL = msgspec.msgpack.Decoder(_Cancel)
_SMALL_BODY = msgspec.msgpack.Decoder(_SMALL)
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


class Envelope:
    """A submit whose items are not decoded yet: ``ids()`` is cheap, ``submit()`` is
    the whole check."""

    def __init__(self, shape: _Envelope) -> None:
        self.shape = shape
        self.raws: list[msgspec.Raw] = shape.items if isinstance(shape.items, list) else []
        self.last_params: tuple[bytes, dict[str, Any]] | None = None

    @property
    def req(self) -> Any:
        return self.shape.req

    def ids(self) -> list[str]:
        """The item ids, without decoding the items (busy and draining refusals)."""
        out = []
        for raw in self.raws:
            try:
                item_id = _ITEM_ID.decode(raw).id
            except (msgspec.DecodeError, RecursionError):
                continue
            if isinstance(item_id, str):
                out.append(item_id)
        return out

    def submit(self) -> P.Submit:
        shape = self.shape
        submit = P.check_envelope(shape.req, shape.items, shape.stream, shape.priority)
        seen: set[str] = set()
        messages = 0
        # Items of one submit nearly always share their params (one file, one setting):
        # the last validated ones are reused when the next item's are equal.
        self.last_params = None
        for i, raw in enumerate(self.raws):
            item = _decode_item(raw, i)
            if isinstance(item, P.ValidationError):
                _reject_undecodable(submit, i, raw, item, seen)
                continue
            chat = item.messages
            messages += len(chat) if isinstance(chat, list) else 0
            if messages > P.MAX_MESSAGES_PER_SUBMIT:
                error = P.ValidationError(
                    f"items[{i}].messages",
                    f"more than {P.MAX_MESSAGES_PER_SUBMIT} chat messages in one submit: "
                    "send fewer items per submit",
                )
                _reject_undecodable(submit, i, raw, error, seen)
                continue
            self._add(submit, i, item, seen)
        return submit

    def _add(self, submit: P.Submit, i: int, item: _Item, seen: set[str]) -> None:
        """As ``protocol.add_item``, from a decoded item's fields (no map per item)."""
        where = f"items[{i}]"
        item_id = P.claim_id_value(item.id, where, seen)
        # Compared as encoded (1, 1.0 and true differ there, not under ==).
        key = _ENCODE(item.params) if item.params is not None else b""
        last = self.last_params
        reused = last[1] if last is not None and last[0] == key else None
        try:
            checked = P.validate_item_parts(
                where,
                item_id,
                item.prompt,
                item.messages,
                item.params,
                item.timeout_s,
                item.model,
                reused,
            )
        except P.ValidationError as exc:
            submit.rejected.append((item_id, exc))
            return
        if reused is None:
            self.last_params = (key, checked.params)
        submit.items.append(checked)


def decode_submit(payload: bytes) -> Envelope:
    try:
        return Envelope(_ENVELOPE.decode(payload))
    except msgspec.DecodeError as exc:
        raise _validation_error(exc, "") from None
    except RecursionError:
        raise _too_deep(payload) from None


def request_id(payload: bytes) -> str | None:
    """The ``req`` of a body that failed to decode, if it can be read (to answer it)."""
    try:
        req = _REQ_ONLY.decode(payload).req
    except msgspec.DecodeError:
        return None
    except RecursionError:  # skipping a deep field: read req without recursion
        req = nesting.scan(payload).req
    return req if isinstance(req, str) else None


def decode_cancel(payload: bytes) -> dict[str, Any]:
    try:
        shape = _CANCEL.decode(payload)
    except msgspec.DecodeError as exc:
        raise _validation_error(exc, "") from None
    except RecursionError:
        raise _too_deep(payload) from None
    out = {name: getattr(shape, name) for name in shape.__struct_fields__}
    if out["ids"] is UNSET:
        del out["ids"]
    return out


def decode_small(payload: bytes) -> dict[str, Any]:
    """PING, STATUS, HELLO, ACK bodies: at most a few scalars each."""
    if len(payload) > SMALL_BODY_BYTES:
        raise P.ValidationError("", f"body larger than {SMALL_BODY_BYTES} bytes")
    try:
        return _SMALL_BODY.decode(payload)
    except msgspec.DecodeError as exc:
        raise _validation_error(exc, "") from None
    except RecursionError:
        raise _too_deep(payload) from None


def _decode_item(raw: msgspec.Raw, i: int) -> _Item | P.ValidationError:
    try:
        return _ITEM.decode(raw)
    except msgspec.DecodeError as exc:
        return _validation_error(exc, f"items[{i}]")
    except RecursionError:
        return _too_deep(bytes(raw), f"items[{i}]")


def _too_deep(payload: bytes, where: str = "") -> P.ValidationError:
    """msgspec recursed too deep: name the field where the walk finds it, else the body."""
    path = nesting.scan(payload).too_deep
    field = ".".join(part for part in (where, path) if part) or "body"
    return P.ValidationError(field, f"nested more than {nesting.MAX_NESTING} levels deep")


def _reject_undecodable(
    submit: P.Submit, i: int, raw: msgspec.Raw, error: P.ValidationError, seen: set[str]
) -> None:
    """An item whose shape is wrong: rejected alone if its id can be read (else the
    envelope is bad, as for any item without a usable id)."""
    try:
        item_id = _ITEM_ID.decode(raw).id
    except (msgspec.DecodeError, RecursionError):
        item_id = None
    submit.rejected.append((P.claim_id_value(item_id, f"items[{i}]", seen), error))


def _validation_error(exc: msgspec.DecodeError, where: str) -> P.ValidationError:
    """msgspec's "Expected `str`, got `array` - at `$.prompt`" as our field + message."""
    text = str(exc)
    match = _AT.search(text)
    path = ""
    if match:
        path = match.group("path").replace("[...]", "")
        text = text[: match.start()]
    unknown = re.match(r"Object contains unknown field `([^`]*)`", text)
    if unknown:
        path, text = f"{path}.{unknown.group(1)}".lstrip("."), "unknown field"
    field = ".".join(part for part in (where, path) if part) or "body"
    if isinstance(exc, msgspec.ValidationError):
        return P.ValidationError(field, text[:1].lower() + text[1:])
    return P.ValidationError(field, "not valid msgpack")
