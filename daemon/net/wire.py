"""The router <-> worker wire: commands and their rows, each encoder beside its decoder.

Both ends are the same install, so the rows are positional arrays, not maps: at tens
of thousands of prompts a second per-item maps showed in the router's profile. The
framing (magic + version, one-byte command, msgpack body) is the client protocol's
(``protocol.pack``/``unpack``); what is inside the bodies is defined here only.

A job's WORK row is encoded once, when the router accepts the item, and kept as
bytes: the router never looks inside it again, a waiting item costs about its wire
size (a chat item decoded into dicts cost ~18x), and a WORK message is the rows'
bytes joined under one header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import msgspec

from exgen.client import protocol as P
from exgen.daemon.engines.base import (
    Choice,
    Chunk,
    Failed,
    Finished,
    Job,
    PromptEcho,
    SamplingParams,
)

READY = b"r"  # worker -> router: Ready
HEARTBEAT = b"h"  # worker -> router: Beat
WORK = b"w"  # router -> worker: {"jobs": [[key, prompt, messages, params, stream]...]}
DONE = b"d"  # worker -> router: {"done": [[key, text, finish, prompt_t, completion_t, extra]...],
#                                "failed": [[key, code, message, field]...]}
#      extra: null, or {"logprobs"?: [...], "choices"?: [{text, finish_reason, ...}...],
#                       "cached_tokens"?: int (leading prompt tokens a prefix cache gave)}
CHUNKS = b"K"  # worker -> router: {"chunks": [[key, text, completion_tokens, prompt_tokens]...]}
CANCEL = b"C"  # router -> worker: {"keys": [key...]}
FATAL = b"f"  # worker -> router: {"slot", "pid", "code", "message"}, then exit

_JOBS_KEY = msgpack.packb("jobs")
_ENCODE = msgspec.msgpack.Encoder().encode
_DEFAULT_SAMPLING = SamplingParams()


# --- WORK ------------------------------------------------------------------------


def encode_job(key: int, item: P.Item, stream: bool) -> bytes:
    """A validated item's WORK row, encoded once at accept (msgspec's encoder: about a
    fifth of msgpack.packb's cost per small row, the same bytes on the wire)."""
    return _ENCODE([key, item.prompt, item.messages, item.params, stream])


def job_streams(row: bytes) -> bool:
    """Whether an encoded WORK row asks for streamed text: its last element, the
    ``stream`` flag, is msgpack's true (0xc3) as the row's last byte."""
    return row[-1:] == b"\xc3"


def pack_work(rows: list[bytes]) -> list[bytes]:
    """The WORK message for these encoded rows (joined, not re-encoded)."""
    body = b"\x81" + _JOBS_KEY + P.array_header(len(rows)) + b"".join(rows)
    return [P.MAGIC_VERSION, WORK, body]


def decode_work(body: dict[str, Any]) -> list[Job]:
    jobs = []
    shared: dict[Any, SamplingParams] = {}
    for key, prompt, messages, params, stream in body["jobs"]:
        jobs.append(Job(key, prompt, messages, _sampling(params, shared), stream))
    return jobs


def _sampling(params: dict[str, Any] | None, shared: dict[Any, SamplingParams]) -> SamplingParams:
    """The rows of one submit carry equal params: they share one SamplingParams (never
    mutated; engines take ``replace``d copies). Params holding lists or maps (stop,
    json_schema) are not hashable and get their own."""
    if not params:
        return _DEFAULT_SAMPLING
    try:
        marker = tuple(params.items())
        found = shared.get(marker)
    except TypeError:
        return SamplingParams.from_wire(params)
    if found is None:
        found = shared[marker] = SamplingParams.from_wire(params)
    return found


# --- DONE and CHUNKS -----------------------------------------------------------------


def pack_done(finished: list[Finished], failed: list[Failed]) -> list[bytes]:
    done = [
        [
            e.key, e.text, e.finish_reason, e.prompt_tokens, e.completion_tokens,
            None if e.logprobs is None and e.choices is None and e.prompt is None
            and not e.cached_tokens else _extra(e),
        ]
        for e in finished
    ]  # fmt: skip
    bad = [[e.key, e.code, e.message, e.field] for e in failed]
    return P.pack(DONE, {"done": done, "failed": bad})


def _extra(event: Finished | Extra) -> dict[str, Any]:
    """What only some results carry (logprobs, n > 1 samples, a prefix-cache hit):
    pack_done calls it for those alone, so a plain result costs no call."""
    extra: dict[str, Any] = {}
    if event.cached_tokens:
        extra["cached_tokens"] = event.cached_tokens
    if event.logprobs is not None:
        extra["logprobs"] = event.logprobs
    if event.choices is not None:
        extra["choices"] = [c.to_wire() for c in event.choices]
    if event.prompt is not None:
        extra["prompt"] = event.prompt.to_wire()
    return extra


class DoneRow(msgspec.Struct, array_like=True, gc=False):
    """One finished job as DONE carries it (``pack_done``'s row), decoded and
    type-checked in C: the router builds its result from the row, no ``Finished``
    between (a third of its cost per prompt at the daemon's ceiling)."""

    key: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    extra: dict[str, Any] | None  # _extra's map: read by parse_extra


class DoneBody(msgspec.Struct, gc=False):
    done: list[DoneRow]
    failed: list[tuple[int, str, str, str | None]]  # key, code, message, field


_DECODE_DONE = msgspec.msgpack.Decoder(DoneBody).decode


def decode_done_body(payload: bytes) -> DoneBody:
    """A DONE message's body; ``msgspec.DecodeError`` (a ValueError) if it is not one,
    nested too deep included (msgspec raises RecursionError there, which no caller
    expects from a decoder)."""
    try:
        return _DECODE_DONE(payload)
    except RecursionError:
        raise msgspec.DecodeError("DONE body nested too deep") from None


class Extra(NamedTuple):
    """A row's ``extra``, checked: what only some results carry."""

    cached_tokens: int
    logprobs: list[Any] | None
    choices: list[Choice] | None
    prompt: PromptEcho | None


def parse_extra(extra: dict[str, Any]) -> Extra:
    """``_extra``'s map read back, each field checked as it is rebuilt (TypeError,
    KeyError or ValueError if one is not what ``_extra`` writes)."""
    choices, prompt = extra.get("choices"), extra.get("prompt")
    return Extra(
        int(extra.get("cached_tokens", 0)),
        extra.get("logprobs"),
        None if choices is None else [Choice(**c) for c in choices],
        None if prompt is None else PromptEcho.from_wire(prompt),
    )


def extra_result(extra: dict[str, Any]) -> dict[str, Any]:
    """A row's ``extra`` as the client's result fields (checked: ``parse_extra``)."""
    return _extra(parse_extra(extra))


def decode_done(body: dict[str, Any]) -> tuple[list[Finished], list[Failed]]:
    """The events ``pack_done`` packed (the inverse the router skips: tests, tools)."""
    typed = msgspec.convert(body, DoneBody)
    finished = []
    for row in typed.done:
        event = Finished(
            row.key, row.text, row.finish_reason, row.prompt_tokens, row.completion_tokens
        )
        if row.extra:
            parsed = parse_extra(row.extra)
            event.cached_tokens, event.logprobs = parsed.cached_tokens, parsed.logprobs
            event.choices, event.prompt = parsed.choices, parsed.prompt
        finished.append(event)
    return finished, [Failed(*row) for row in typed.failed]


def pack_chunks(chunks: list[Chunk]) -> list[bytes]:
    rows = [[c.key, c.text, c.completion_tokens, c.prompt_tokens] for c in chunks]
    return P.pack(CHUNKS, {"chunks": rows})


def decode_chunks(body: dict[str, Any]) -> list[Chunk]:
    return [Chunk(int(row[0]), str(row[1]), *map(int, row[2:4])) for row in body["chunks"]]


# --- CANCEL ------------------------------------------------------------------------


def pack_cancel(keys: list[int]) -> list[bytes]:
    return P.pack(CANCEL, {"keys": keys})


def decode_cancel(body: dict[str, Any]) -> list[int]:
    return [int(key) for key in body.get("keys", ())]


# --- READY, HEARTBEAT, FATAL ---------------------------------------------------------


@dataclass(slots=True)
class Ready:
    slot: int
    pid: int
    engine: str
    capacity: int
    max_seq_len: int | None
    load_s: float
    describe: dict[str, Any]


def pack_ready(ready: Ready) -> list[bytes]:
    return P.pack(READY, {name: getattr(ready, name) for name in Ready.__slots__})


def decode_ready(body: dict[str, Any]) -> Ready:
    max_seq_len = body.get("max_seq_len")
    return Ready(
        slot=int(body["slot"]),
        pid=int(body["pid"]),
        engine=str(body.get("engine")),
        capacity=max(1, int(body["capacity"])),
        max_seq_len=int(max_seq_len) if max_seq_len is not None else None,
        load_s=float(body.get("load_s", 0.0)),
        describe=dict(body.get("describe") or {}),
    )


@dataclass(slots=True)
class Beat:
    slot: int
    pid: int
    state: str  # "loading" or "ready"
    progress: int  # engine steps + decode steps: stalls when a step is wedged
    pending: int
    tokens: int
    # The engine's running totals (Engine.counters(): prefix_hits, prefill_tokens_saved,
    # prefill_tokens, prefix_lookups where it has a prefix cache); {} when it has none.
    counters: dict[str, int] = field(default_factory=dict)


def pack_heartbeat(beat: Beat) -> list[bytes]:
    return P.pack(HEARTBEAT, {name: getattr(beat, name) for name in Beat.__slots__})


def decode_heartbeat(body: dict[str, Any]) -> Beat:
    return Beat(
        slot=int(body["slot"]),
        pid=int(body["pid"]),
        state=str(body.get("state", "")),
        progress=int(body.get("progress", 0)),
        pending=int(body.get("pending", 0)),
        tokens=int(body.get("tokens", 0)),
        counters={str(k): int(v) for k, v in (body.get("counters") or {}).items()},
    )


@dataclass(slots=True)
class Fatal:
    slot: int
    pid: int
    code: str
    message: str


def pack_fatal(fatal: Fatal) -> list[bytes]:
    return P.pack(FATAL, {name: getattr(fatal, name) for name in Fatal.__slots__})


def decode_fatal(body: dict[str, Any]) -> Fatal:
    return Fatal(int(body["slot"]), int(body["pid"]), str(body["code"]), str(body["message"]))
