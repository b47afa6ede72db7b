"""The wire protocol between clients, the router and workers.

Every message is three ZMQ frames (after any routing envelope):

    [ MAGIC_VERSION | command (1 byte) | msgpack body (a map) ]

``MAGIC_VERSION`` carries the protocol version, so a peer of another version is
answered with a clear error instead of a misparse.  Bodies are plain msgpack maps
(never pickle).  Every field a client sends is validated here, with limits, and a
failure names the field: :func:`validate_submit` is the one gate for user input.

No sockets here: this module is pure so it can be unit-tested and imported by the
light client without pulling in anything else.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgpack

from exgen.client.exgen_error import ExgenError

PROTOCOL_VERSION = 2  # docs/protocol.md
MAGIC = b"EXG"
MAGIC_VERSION = MAGIC + bytes([PROTOCOL_VERSION])

# --- client <-> router -----------------------------------------------------------
HELLO = b"H"  # client -> router: {"req", "name"?, "host"?, "pid"?}; answered with WELCOME
SUBMIT = b"S"  # client -> router: {"req", "items": [item...], "stream"?, "priority"?}
CANCEL = b"C"  # client -> router: {"req"?, "ids"} | {"all": true} | {"client"} | {"clients": "all"}
STATUS = b"?"  # client -> router: {}
ACK = b"a"  # client -> router: {"seq", "resend"?}: every RESULTS up to seq arrived
ACCEPTED = b"A"  # router -> client: {"req", "n", "queued"}
RESULTS = b"R"  # router -> client: {"req"?, "results": [result...]}
# router -> client: {"chunks": [[id, text, completion_tokens?, prompt_tokens?]...]}: the
# counts so far (a router before them sends [id, text])
CHUNKS = b"K"
ERROR = b"E"  # router -> client: {"req"?, "code", "message", "field"?}
STATUS_REPLY = b"!"  # router -> client: the status document
PING = b"p"  # client -> router: {"req"?}; liveness while waiting for long results
PONG = b"P"  # router -> client: {"req"?, "instance", "draining", "seq", "known"}
WELCOME = b"W"  # router -> client: {"req", "instance", "model", "engine", "client", "limits"}
CANCELLED = b"c"  # router -> client: {"req", "cancelled", "clients"} (another client's work)

# The router <-> worker commands and rows are the daemon's: exgen.daemon.net.wire.

CLIENT_COMMANDS = frozenset({HELLO, SUBMIT, CANCEL, STATUS, PING, ACK})

# --- error codes that cross the wire (see exgen.client.errors) --------------------
E_BAD_REQUEST = "bad_request"
E_PROMPT_TOO_LONG = "prompt_too_long"
E_BUSY = "busy"
E_DRAINING = "draining"
E_WORKER_DIED = "worker_died"
E_ENGINE = "engine_error"
E_CANCELLED = "cancelled"
E_PROTOCOL = "protocol"
E_INTERNAL = "internal"
E_TIMEOUT = "timeout"  # an item's deadline (timeout_s) passed
E_MODEL_NOT_FOUND = "model_not_found"  # strict model names: the item names another model
E_FORBIDDEN = "forbidden"  # cancelling work that is not the caller's to cancel
E_TOO_LARGE = "too_large"  # a result too large for the wire

# --- limits ----------------------------------------------------------------------
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # ZMQ_MAXMSGSIZE on the client socket
MAX_ITEMS_PER_SUBMIT = 10_000
MAX_ID_CHARS = 256  # a caller's item ids (and request ids)
MAX_WIRE_ID_CHARS = 320  # an item id on the wire: room for a library's own prefix
MAX_MESSAGES_PER_SUBMIT = 100_000  # chat messages in all the items of one submit
MAX_TIMEOUT_S = 1e7
MAX_MODEL_CHARS = 256
MAX_CLIENT_NAME_CHARS = 200
PRIORITIES = ("interactive", "batch")  # dispatched in this order
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_IDS = 262_144  # a prompt given as token ids (vLLM's and OpenAI's token prompts)
MAX_TOKEN_ID = 2**31 - 1
MAX_MESSAGES = 1_000
MAX_NEW_TOKENS = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_N = 16  # samples of one prompt (n)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_SCHEMA_CHARS = 64 * 1024  # a JSON Schema, as JSON text
MAX_SCHEMA_DEPTH = 32  # nesting of its maps and lists
JSON_OBJECT_SCHEMA = '{"type":"object"}'  # response_format json_object: any JSON object

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ERROR = "error"

# Sampling defaults: greedy and 256 new tokens, the safe choice for batch jobs.
DEFAULT_PARAMS: dict[str, Any] = {
    "max_new_tokens": 256,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "seed": None,
    "stop": [],
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "n": 1,
    "logprobs": False,
    "top_logprobs": 0,  # > 0 implies logprobs
    "json_schema": None,  # the JSON Schema every output must match, as compact JSON text
    # vLLM's extensions, which its clients (load generators, harnesses) send by default.
    "ignore_eos": False,  # the end-of-sequence token does not end the text
    "min_tokens": 0,  # neither EOS nor a stop string ends the text before this many
    "skip_special_tokens": True,  # special tokens (EOS, template markers) left out of text
    "include_stop_str_in_output": False,  # the stop string that ended the text kept in it
    # The prompt itself in the result: its token ids and their text (echo), and each
    # prompt token's logprob with this many alternatives (vLLM's prompt_logprobs): what
    # loglikelihood evaluations ask, most with max_new_tokens 0.
    "echo": False,
    "prompt_logprobs": None,
    "add_special_tokens": True,  # a text prompt's BOS and such (chat templates carry theirs)
}
# ``response_format`` (OpenAI's shape, or "json_object") is accepted where params are
# and becomes ``json_schema``: the wire carries only the latter.
PARAM_NAMES = frozenset(DEFAULT_PARAMS) | {"response_format"}
ITEM_KEYS = frozenset({"id", "prompt", "messages", "params", "timeout_s", "model"})
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


class ValidationError(ExgenError, ValueError):
    """A well-formed request with a bad field; ``field`` names it (dotted path)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class FrameError(ValueError):
    """Frames that are not a message of this protocol (garbage, wrong version)."""


# --- framing ---------------------------------------------------------------------


def pack(command: bytes, body: dict[str, Any]) -> list[bytes]:
    return [MAGIC_VERSION, command, msgpack.packb(body, use_bin_type=True)]


def array_header(n: int) -> bytes:
    """The msgpack header of an n-element array (for bodies joined from encoded parts)."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 0x10000:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


_SESSION_KEY = msgpack.packb("session")
_SEQ_KEY = msgpack.packb("seq")
_RESULTS_KEY = msgpack.packb("results")


def results_body(session: int, seq: int, encoded: list[bytes]) -> bytes:
    """A RESULTS body, ``{"session", "seq", "results"}``, from results encoded one by one
    (so the router knows each one's size before it groups them)."""
    return b"".join(
        [
            b"\x83",
            _SESSION_KEY,
            msgpack.packb(session),
            _SEQ_KEY,
            msgpack.packb(seq),
            _RESULTS_KEY,
            array_header(len(encoded)),
            *encoded,
        ]
    )


def unpack(frames: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    """Parse the three protocol frames; raise FrameError saying what is wrong."""
    command, payload = unpack_header(frames)
    return command, unpack_body(payload)


def unpack_body(payload: bytes) -> dict[str, Any]:
    """A message's msgpack body, which must be a map; FrameError if it is not."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"body is not valid msgpack: {exc.__class__.__name__}") from None
    if not isinstance(body, dict):
        raise FrameError("body must be a map")
    return body


def unpack_header(frames: list[bytes]) -> tuple[bytes, bytes]:
    """The command and the undecoded body; FrameError for frames of another protocol."""
    if len(frames) != 3:
        raise FrameError(f"expected 3 frames, got {len(frames)}")
    magic, command, payload = frames
    if magic[:3] != MAGIC or len(magic) != 4:
        raise FrameError("not an exgen message (bad magic)")
    if magic[3] != PROTOCOL_VERSION:
        raise FrameError(
            f"protocol version {magic[3]} not supported (this peer speaks {PROTOCOL_VERSION})"
        )
    if len(command) != 1:
        raise FrameError("command frame must be one byte")
    return command, payload


# --- items -----------------------------------------------------------------------


@dataclass(slots=True)
class Item:
    """One prompt of a submit, validated."""

    id: str
    prompt: str | list[int] | None  # text, or the model's token ids
    messages: list[dict[str, str]] | None
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None  # deadline from acceptance
    model: str | None = None  # the model the request names (strict_model checks it)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "params": self.params}
        if self.messages is not None:
            out["messages"] = self.messages
        else:
            out["prompt"] = self.prompt
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        if self.model is not None:
            out["model"] = self.model
        return out


def _check_number(
    name: str, value: Any, lo: float, hi: float, *, integer: bool = False
) -> float | int:
    kind = type(value)
    # The common case first, with no isinstance chain: a plain int (or a float where
    # floats are allowed) in range. NaN and inf fail the comparison and go on below.
    if (kind is int or (kind is float and not integer)) and lo <= value <= hi:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValidationError(name, "must be an integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(name, "must be finite")
    if not lo <= value <= hi:
        raise ValidationError(name, f"must be between {lo:g} and {hi:g}, got {value}")
    return value


def _positive_fraction(value: Any) -> float:
    out = float(_check_number("", value, 0.0, 1.0))
    if out == 0.0:
        raise ValidationError("", "must be greater than 0")
    return out


def _optional_seed(value: Any) -> int | None:
    return None if value is None else int(_check_number("", value, 0, MAX_SEED, integer=True))


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError("", f"must be true or false, got {type(value).__name__}")
    return value


def _check_json_schema(value: Any) -> str | None:
    """A JSON Schema (a map, or its JSON text) as compact JSON text; None: no constraint.

    Only the shape is checked here (size, nesting, a map); whether the grammar engine
    can compile it is the worker's answer, per item.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        try:
            # NaN and inf are written out as such: _schema_text refuses them as it
            # refuses them in a schema given as text, with the same words.
            value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise ValidationError("", f"not JSON-serialisable: {exc}") from None
        except RecursionError:
            raise ValidationError("", f"nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    if not isinstance(value, str):
        raise ValidationError("", "must be a JSON Schema: a map, or its JSON text")
    if len(value) > MAX_SCHEMA_CHARS:
        raise ValidationError("", f"longer than {MAX_SCHEMA_CHARS} characters of JSON")
    return _schema_text(value)


@functools.lru_cache(maxsize=64)
def _schema_text(text: str) -> str:
    """The compact text of a schema's JSON, checked once per distinct text (a file of
    100,000 lines usually carries one schema)."""
    try:
        schema = json.loads(text, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except RecursionError:
        raise ValidationError("", f"nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValidationError:
        raise
    except ValueError as exc:
        raise ValidationError("", f"not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ValidationError("", "must be a JSON object (a schema), got " + type(schema).__name__)
    _check_depth(schema)
    # Key order is kept: the grammar generates properties in the schema's order.
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


_NON_FINITE = "must not hold NaN or Infinity (JSON has no such numbers)"


def _refuse_non_finite(token: str) -> NoReturn:
    """json.loads would take NaN, Infinity and -Infinity; JSON (and a map's check) does not."""
    raise ValidationError("", _NON_FINITE)


def _finite_float(token: str) -> float:
    """A JSON number; one too large for a float (1e999) would be Infinity."""
    value = float(token)
    if not math.isfinite(value):
        raise ValidationError("", _NON_FINITE)
    return value


def _check_depth(schema: Any) -> None:
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValidationError("", f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def schema_of_response_format(value: Any) -> str | None:
    """OpenAI's ``response_format`` as a ``json_schema`` param (None: free text).

    ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object), or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}``;
    the strings "text" and "json_object" are short for the first two.
    """
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise ValidationError("", 'must be a map such as {"type": "json_object"}')
    kind = value.get("type")
    extra = set(value) - {"type", "json_schema"}
    if extra:
        raise ValidationError(f".{sorted(extra)[0]}", "unknown field")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise ValidationError(".type", "must be text, json_object or json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise ValidationError(".json_schema", 'must be a map holding "schema" (and "name")')
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise ValidationError(f".json_schema.{sorted(unknown)[0]}", "unknown field")
    try:
        return _check_json_schema(spec["schema"])
    except ValidationError as exc:
        raise ValidationError(f".json_schema.schema{exc.field}", exc.message) from None


# One checker per parameter: value -> the normalised value, or ValidationError with
# the field relative to the parameter ("" or "[i]"). Every item of a submit goes
# through these: a table lookup, and the field's path is built only for an error.
_PARAM_CHECKS: dict[str, Callable[[Any], Any]] = {
    "max_new_tokens": lambda v: _check_number("", v, 0, MAX_NEW_TOKENS, integer=True),
    "temperature": lambda v: float(_check_number("", v, 0.0, 100.0)),
    "top_p": _positive_fraction,
    "top_k": lambda v: _check_number("", v, 0, 1_000_000, integer=True),
    "min_p": lambda v: float(_check_number("", v, 0.0, 1.0)),
    "repetition_penalty": lambda v: float(_check_number("", v, 0.01, 100.0)),
    "seed": _optional_seed,
    "stop": lambda v: _validate_stop("", v),
    "presence_penalty": lambda v: float(_check_number("", v, -2.0, 2.0)),
    "frequency_penalty": lambda v: float(_check_number("", v, -2.0, 2.0)),
    "n": lambda v: _check_number("", v, 1, MAX_N, integer=True),
    "logprobs": _check_bool,
    "top_logprobs": lambda v: _check_number("", v, 0, MAX_TOP_LOGPROBS, integer=True),
    "json_schema": _check_json_schema,
    "response_format": schema_of_response_format,
    "ignore_eos": _check_bool,
    "min_tokens": lambda v: _check_number("", v, 0, MAX_NEW_TOKENS, integer=True),
    "skip_special_tokens": _check_bool,
    "include_stop_str_in_output": _check_bool,
    "echo": _check_bool,
    "add_special_tokens": _check_bool,
    "prompt_logprobs": lambda v: (
        None if v is None else _check_number("", v, 0, MAX_TOP_LOGPROBS, integer=True)
    ),
}
assert set(_PARAM_CHECKS) == PARAM_NAMES


def validate_params(raw: Any, where: str = "params") -> dict[str, Any]:
    """Sampling parameters: unknown names are refused, every value range-checked."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationError(where, "must be a map")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        check = _PARAM_CHECKS.get(name)
        if check is None:
            raise ValidationError(
                f"{where}.{name}", f"unknown parameter (known: {', '.join(sorted(PARAM_NAMES))})"
            )
        try:
            checked = check(value)
        except ValidationError as exc:
            raise ValidationError(f"{where}.{name}{exc.field}", exc.message) from None
        if name == "response_format":
            if "json_schema" in raw:
                raise ValidationError(
                    f"{where}.response_format", "give response_format or json_schema, not both"
                )
            name = "json_schema"
        if checked is not None or name not in _NONE_MEANS_UNSET:
            out[name] = checked
    if out.get("min_tokens", 0) > out.get("max_new_tokens", MAX_NEW_TOKENS):
        raise ValidationError(f"{where}.min_tokens", "must not be more than max_new_tokens")
    if out.get("json_schema") is not None:
        for name in ("ignore_eos", "min_tokens"):
            if out.get(name):  # a schema's end is the text's end: no EOS to hold back
                raise ValidationError(f"{where}.{name}", "cannot be combined with a JSON schema")
    return out


_NONE_MEANS_UNSET = frozenset({"seed", "json_schema", "prompt_logprobs"})


def _validate_stop(path: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValidationError(path, "must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise ValidationError(path, f"at most {MAX_STOP_STRINGS} stop strings")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            raise ValidationError(f"{path}[{i}]", "must be a non-empty string")
        if len(s) > MAX_STOP_CHARS:
            raise ValidationError(f"{path}[{i}]", f"longer than {MAX_STOP_CHARS} characters")
    return list(value)


def _validate_messages(path: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValidationError(path, "must be a non-empty list of {role, content} maps")
    if len(value) > MAX_MESSAGES:
        raise ValidationError(path, f"at most {MAX_MESSAGES} messages")
    total = 0
    out = []
    for i, msg in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(msg, dict):
            raise ValidationError(where, "must be a map with role and content")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:  # a map is unhashable
            raise ValidationError(
                f"{where}.role", f"must be one of {', '.join(sorted(CHAT_ROLES))}"
            )
        if not isinstance(content, str):
            raise ValidationError(f"{where}.content", "must be a string")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_PROMPT_CHARS:
        raise ValidationError(path, f"longer than {MAX_PROMPT_CHARS} characters in all")
    return out


def validate_item(
    raw: Any,
    where: str,
    checked_params: dict[str, Any] | None = None,
    id_limit: int = MAX_ID_CHARS,
) -> Item:
    """One caller's item; ``checked_params``: its params, already validated (they are
    not again). ``id_limit``: a caller's ids are shorter than the wire allows."""
    if not isinstance(raw, dict):
        raise ValidationError(where, "must be a map")
    return _validate_item_fields(raw, where, _check_item_id(raw, where, id_limit), checked_params)


def _validate_item_fields(
    raw: dict[str, Any], where: str, item_id: str, checked_params: dict[str, Any] | None = None
) -> Item:
    """An item whose id is already checked (validate_submit checks ids first)."""
    if not ITEM_KEYS.issuperset(raw):  # no set built per item on the common path
        unknown = set(raw) - ITEM_KEYS
        raise ValidationError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    get = raw.get
    return validate_item_parts(
        where,
        item_id,
        get("prompt"),
        get("messages"),
        get("params"),
        get("timeout_s"),
        get("model"),
        checked_params,
    )


def _check_prompt(path: str, prompt: Any) -> str | list[int]:
    """Text, or token ids (what the engine's tokenizer gave a client: the model's own);
    an integral float is its integer, as for every integer here."""
    if isinstance(prompt, str):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValidationError(path, f"longer than {MAX_PROMPT_CHARS} characters")
        return prompt
    if not isinstance(prompt, list):
        raise ValidationError(path, "must be a string or a list of token ids")
    if not prompt or len(prompt) > MAX_PROMPT_IDS:
        raise ValidationError(path, f"must hold 1 to {MAX_PROMPT_IDS} token ids")
    if all(type(t) is int for t in prompt) and min(prompt) >= 0 and max(prompt) <= MAX_TOKEN_ID:
        return prompt  # the common case, checked in C
    return [
        int(_check_number(f"{path}[{i}]", t, 0, MAX_TOKEN_ID, integer=True))
        for i, t in enumerate(prompt)
    ]


def validate_item_parts(
    where: str,
    item_id: str,
    prompt: Any,
    messages: Any,
    raw_params: Any,
    timeout_s: Any,
    model: Any,
    checked_params: dict[str, Any] | None = None,
) -> Item:
    """An item's fields as given (None: absent), checked; its id is checked already.
    The router's decoder calls this with a decoded item's fields, a map's caller
    through ``validate_item``: one set of checks for both."""
    if (prompt is None) == (messages is None):
        raise ValidationError(where, "needs exactly one of prompt or messages")
    if prompt is not None:
        prompt = _check_prompt(f"{where}.prompt", prompt)
    checked_messages = (
        None if messages is None else _validate_messages(f"{where}.messages", messages)
    )
    params = checked_params
    if params is None:
        params = validate_params(raw_params, f"{where}.params")
    item = Item(item_id, prompt, checked_messages, params)
    if timeout_s is not None:
        item.timeout_s = float(_check_number(f"{where}.timeout_s", timeout_s, 0.0, MAX_TIMEOUT_S))
        if item.timeout_s <= 0:
            raise ValidationError(f"{where}.timeout_s", "must be greater than 0")
    if model is not None:
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
            raise ValidationError(
                f"{where}.model", f"must be a non-empty string of at most {MAX_MODEL_CHARS} chars"
            )
        item.model = model
    return item


@dataclass(slots=True)
class Submit:
    req: str
    items: list[Item]
    stream: bool
    priority: str = PRIORITIES[0]
    # Items whose id is fine but whose content is not: (id, error). Answered one by
    # one so a single bad line never costs the rest of a batch its work.
    rejected: list[tuple[str, ValidationError]] = field(default_factory=list)


def _check_item_id(raw: Any, where: str, limit: int = MAX_WIRE_ID_CHARS) -> str:
    return _check_id_value(raw.get("id") if isinstance(raw, dict) else None, where, limit)


def _check_id_value(item_id: Any, where: str, limit: int) -> str:
    if not isinstance(item_id, str) or not item_id:
        raise ValidationError(f"{where}.id", "must be a non-empty string")
    if len(item_id) > limit:
        raise ValidationError(f"{where}.id", f"longer than {limit} characters")
    return item_id


def validate_submit(body: dict[str, Any]) -> Submit:
    """The one gate for a client's submit.

    Raises ValidationError (naming the field) when the envelope is bad (no req, no
    items, an item without a usable id, duplicate ids); an item with a usable id but
    bad content lands in ``Submit.rejected`` instead. (The router decodes frames with
    ``exgen.daemon.router.decode``, which bounds the decoding cost and then comes here, to
    ``check_envelope`` and ``add_item``.)
    """
    items = body.get("items")
    submit = check_envelope(
        body.get("req"), items, body.get("stream", False), body.get("priority", PRIORITIES[0])
    )
    assert isinstance(items, list)
    seen: set[str] = set()
    for i, raw in enumerate(items):
        add_item(submit, i, raw, seen)
    return submit


def check_envelope(req: Any, items: Any, stream: Any, priority: Any) -> Submit:
    """A submit's own fields; the Submit to add its items to."""
    if not isinstance(req, str) or not req or len(req) > MAX_ID_CHARS:
        raise ValidationError(
            "req", f"must be a non-empty string of at most {MAX_ID_CHARS} characters"
        )
    if not isinstance(items, list) or not items:
        raise ValidationError("items", "must be a non-empty list")
    if len(items) > MAX_ITEMS_PER_SUBMIT:
        raise ValidationError("items", f"at most {MAX_ITEMS_PER_SUBMIT} items per submit")
    if not isinstance(stream, bool):
        raise ValidationError("stream", "must be true or false")
    if priority not in PRIORITIES:
        raise ValidationError("priority", f"must be one of {', '.join(PRIORITIES)}")
    return Submit(req, [], stream, priority)


def claim_id(raw: Any, where: str, seen: set[str]) -> str:
    """The id of item ``raw`` (a map), checked and not yet ``seen`` in this submit."""
    return claim_id_value(raw.get("id") if isinstance(raw, dict) else None, where, seen)


def claim_id_value(value: Any, where: str, seen: set[str]) -> str:
    """An item id as given, checked and not yet ``seen`` in this submit."""
    item_id = _check_id_value(value, where, MAX_WIRE_ID_CHARS)
    if item_id in seen:
        raise ValidationError(f"{where}.id", f"duplicate id {item_id!r} in this submit")
    seen.add(item_id)
    return item_id


def add_item(submit: Submit, i: int, raw: Any, seen: set[str]) -> None:
    """Item ``i`` into ``submit.items``, or ``submit.rejected`` if only its content is
    bad; ValidationError if it has no usable id or repeats one (the envelope is bad)."""
    where = f"items[{i}]"
    item_id = claim_id(raw, where, seen)
    try:
        submit.items.append(_validate_item_fields(raw, where, item_id))
    except ValidationError as exc:
        submit.rejected.append((item_id, exc))


# One setting, two spellings: an item's own choice of either replaces the call's.
STRUCTURED_OUTPUT_PARAMS = frozenset({"json_schema", "response_format"})


def overlaid_params(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A call's default params with an item's own on top (to be validated). The item's
    ``json_schema`` or ``response_format`` replaces the call's structured output,
    whichever spelling either used; both spellings in ``own`` stay an error."""
    if not STRUCTURED_OUTPUT_PARAMS.isdisjoint(own):
        defaults = {k: v for k, v in defaults.items() if k not in STRUCTURED_OUTPUT_PARAMS}
    return {**defaults, **own}


def merged_params(params: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with a request's own (validated) params."""
    out = dict(DEFAULT_PARAMS)
    out.update(params)
    return out


def result_error(
    item_id: str, code: str, message: str, field_name: str | None = None
) -> dict[str, Any]:
    """A per-item error result, as it crosses the wire."""
    err: dict[str, Any] = {"code": code, "message": message}
    if field_name is not None:
        err["field"] = field_name
    return {
        "id": item_id,
        "text": "",
        "finish_reason": FINISH_ERROR,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "slot": None,
        "error": err,
    }


def error_body(
    code: str, message: str, *, req: str | None = None, field_name: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if req is not None:
        body["req"] = req
    if field_name is not None:
        body["field"] = field_name
    return body
