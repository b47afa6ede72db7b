"""Batch files: ``prompts.jsonl`` in, ``results.jsonl`` out. Pure: no sockets.

Input, one JSON object a line (blank lines are skipped; line numbers count them):

* plain  ``{"id"?, "prompt": "...", <params>...}``
* chat   ``{"id"?, "messages": [{"role", "content"}...], <params>...}``
* OpenAI Batch API ``{"custom_id", "method": "POST", "url", "body": {...}}`` with url
  ``/v1/chat/completions`` (body ``messages``) or ``/v1/completions`` (body ``prompt``).

Params of plain and chat lines sit at the top level (or in a ``"params"`` map) under
the names of :data:`protocol.PARAM_NAMES`; ``max_tokens`` is an alias of
``max_new_tokens``. ``timeout_s`` (top level) is the line's deadline in seconds.
In an OpenAI body, ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``n``, ``presence_penalty``,
``frequency_penalty``, ``response_format`` (``json_object``, ``json_schema``: the
output is constrained to it) and ``logprobs`` / ``top_logprobs`` (chat: a bool and a
count; completions: ``logprobs: N`` asks for N alternatives) are mapped, and the
common extensions ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``min_tokens``, ``skip_special_tokens`` and ``include_stop_str_in_output`` are accepted
as vLLM does. A line's params override the command line's defaults.

Strictness, on purpose: an unknown key rejects the line with a message naming it (a
typo like ``temprature`` must not silently run a whole file greedily). OpenAI body
fields that cannot change the text (``user``, ``metadata``, ``store``,
``service_tier``, ...) are ignored; ``model`` is sent with the item (a daemon with
``strict_model`` refuses a line naming another model, as a 404); fields that would
change it and that exgen cannot honour (``best_of`` > 1, ``stream``, ``tools``,
``logit_bias``, ...) reject the line unless they hold their neutral value
(``best_of: 1``, ``stream: false``, ...).

A missing ``id`` becomes ``line-N`` (N the 1-based line number, stable across
``--resume`` as long as the file is unchanged). A repeated id rejects the later line,
whose error keeps the id and names the line (``"line": N``). A string that cannot be
encoded as UTF-8 (a lone surrogate such as ``"\ud800"``, escaped in the JSON) rejects
its line alone, naming the field.
Every problem is a :class:`LineError` — never a silently dropped line — and is also
written to the output, so the output accounts for every input line.

Output: plain/chat lines get ``{"id", "text", "finish_reason", "prompt_tokens",
"completion_tokens", "error"}`` (``error``: null or ``{"code", "message"}``), and
where the line asked: ``"logprobs": [{"token", "logprob", "top_logprobs": [{"token",
"logprob"}...]}...]`` and, for n > 1, ``"choices": [{"text", "finish_reason",
"completion_tokens", "logprobs"?}...]``; with ``echo`` or ``prompt_logprobs``,
``"prompt": {"ids", "text", "logprobs"}``. OpenAI lines get n choices and OpenAI's
logprobs shapes (chat: ``logprobs.content``; completions: ``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``). Timing
and slot are left out so that two greedy runs give identical files. OpenAI lines get
the OpenAI batch output shape (:func:`format_result`): ``body.model`` is the model
the daemon serves, whatever the line asked for; a failed OpenAI line has OpenAI's
error-file shape (``response.status_code`` 400/404/500 with ``body.error``; a
cancelled or timed-out line ``response: null`` and ``error``). A malformed line is
answered with an error whose object also carries ``"line"``.

Resume (:func:`prepare_resume`): ids with a successful result count as done; error
lines and a truncated last line are removed, so a resumed run retries failures and
each id ends up in the file exactly once.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from exgen.client import protocol as P
from exgen.client.calls import unencodable_field

logger = logging.getLogger(__name__)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OPENAI_URLS = (CHAT_URL, COMPLETIONS_URL)
DEFAULT_MODEL_NAME = "exgen"  # echoed as OpenAI "model" when the line names none

# Names a plain/chat line may use for a param, mapped to the wire name.
PARAM_ALIASES: dict[str, str] = {name: name for name in P.PARAM_NAMES} | {
    "max_tokens": "max_new_tokens"
}
_PLAIN_KEYS = frozenset({"id", "prompt", "messages", "params", "timeout_s"}) | frozenset(
    PARAM_ALIASES
)

# OpenAI body fields mapped onto exgen params.
OPENAI_PARAM_ALIASES: dict[str, str] = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "n": "n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "response_format": "response_format",
    "top_logprobs": "top_logprobs",
    # logprobs: a bool on chat, a count on completions (see _openai_logprobs)
    # Not OpenAI, but the usual extensions of OpenAI-compatible servers (vLLM).
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens",
    "skip_special_tokens": "skip_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "prompt_logprobs": "prompt_logprobs",
    "add_special_tokens": "add_special_tokens",
    # echo: completions only (see _openai_echo)
}
# OpenAI body fields that cannot change the generated text: accepted and ignored.
OPENAI_IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "stream_options",
        "prompt_cache_key",
        "safety_identifier",
    }
)
# OpenAI body fields exgen cannot honour: fine at their neutral values, else the
# line is rejected with the reason given.
OPENAI_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((1, None), "only best_of=1 is supported"),
    "stream": ((False, None), "streaming is not supported in a batch file"),
    "logit_bias": ((None,), "not supported"),
    "suffix": ((None, ""), "not supported"),
    "tools": ((None,), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None,), "tool calling is not supported"),
    "function_call": ((None, "none"), "tool calling is not supported"),
}
OPENAI_LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
COMPLETIONS_MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One good input line, ready to send."""

    line_no: int
    id: str
    prompt: str | list[int] | None = None  # text, or token ids
    messages: list[dict[str, str]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    url: str | None = None  # set for OpenAI lines: which endpoint they address
    model: str | None = None  # an OpenAI body's "model": sent, for strict daemons
    timeout_s: float | None = None  # the line's own deadline

    @property
    def is_openai(self) -> bool:
        return self.url is not None

    def to_item(self) -> dict[str, Any]:
        """The item for ``Client.iter_results``."""
        item: dict[str, Any] = {"id": self.id, "params": self.params}
        if self.messages is not None:
            item["messages"] = self.messages
        else:
            item["prompt"] = self.prompt
        if self.model is not None:
            item["model"] = self.model
        if self.timeout_s is not None:
            item["timeout_s"] = self.timeout_s
        return item


@dataclass(frozen=True, slots=True)
class LineError:
    """A line that cannot be sent, with why. ``id``: the line's own if usable."""

    line_no: int
    message: str
    id: str
    is_openai: bool = False

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.message}"


Entry = BatchLine | LineError


class _Malformed(Exception):
    """Raised inside the parser; becomes a LineError."""


# --- reading ---------------------------------------------------------------------


def fallback_id(line_no: int) -> str:
    return f"line-{line_no}"


def read_batch(lines: Iterable[bytes | str]) -> Iterator[Entry]:
    """Parse lines lazily; one BatchLine or LineError per non-blank line."""
    seen: set[str] = set()
    openai_seen = False  # an unparseable line is answered in the file's style
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        entry = parse_line(raw, line_no, openai_default=openai_seen)
        if isinstance(entry, BatchLine):
            openai_seen = entry.is_openai
            if entry.id in seen:
                # Its error keeps the id and names its line: the other answer for the
                # id is the earlier line's.
                yield LineError(
                    line_no,
                    f"duplicate id {entry.id!r} (already used by an earlier line)",
                    entry.id,
                    entry.is_openai,
                )
                continue
            seen.add(entry.id)
        yield entry


def open_batch(path: str | Path) -> Iterator[Entry]:
    """read_batch over a file, read in binary so a bad byte costs one line, not the run."""
    with open(path, "rb") as f:
        yield from read_batch(f)


def count_lines(path: str | Path) -> int:
    """Non-blank lines of a file: the progress bar's total, counted fast."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def parse_line(raw: bytes | str, line_no: int, *, openai_default: bool = False) -> Entry:
    """One line -> BatchLine, or LineError saying what is wrong with it."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        return LineError(line_no, "not valid UTF-8", fallback_id(line_no), openai_default)
    except json.JSONDecodeError as exc:
        message = f"not valid JSON ({exc.msg} at column {exc.colno})"
        return LineError(line_no, message, fallback_id(line_no), openai_default)
    if not isinstance(obj, dict):
        message = f"must be a JSON object, got {_json_type(obj)}"
        return LineError(line_no, message, fallback_id(line_no), openai_default)
    is_openai = bool(OPENAI_LINE_KEYS & obj.keys())
    item_id = _usable_id(obj.get("custom_id" if is_openai else "id"), line_no)
    try:
        _check_encodable(obj, raw)
        if is_openai:
            return _parse_openai(obj, line_no)
        return _parse_plain(obj, line_no)
    except _Malformed as exc:
        return LineError(line_no, str(exc), item_id, is_openai)


def _check_encodable(obj: dict[str, Any], raw: bytes | str) -> None:
    """A lone surrogate (only a JSON ``\\uD8xx``-``\\uDFxx`` escape can make one) cannot
    be sent: the line is refused naming the field, and costs the others nothing."""
    text = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if b"\\ud" not in text and b"\\uD" not in text:
        return  # the common case: no escape of that range, nothing to walk
    where = unencodable_field(obj)
    if where is not None:
        raise _Malformed(f"{where}: holds a lone surrogate, which cannot be encoded as UTF-8")


def _usable_id(value: Any, line_no: int) -> str:
    if isinstance(value, str) and value and len(value) <= P.MAX_ID_CHARS:
        return value
    return fallback_id(line_no)


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _check_id(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Malformed(f"{key} must be a non-empty string")
    if len(value) > P.MAX_ID_CHARS:
        raise _Malformed(f"{key} is longer than {P.MAX_ID_CHARS} characters")
    return value


def _unknown_key(key: str, known: Iterable[str], where: str = "") -> _Malformed:
    hint = difflib.get_close_matches(key, list(known), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return _Malformed(f"unknown key {where}{key!r}{suggestion}")


def _map_params(
    source: Mapping[str, Any], aliases: Mapping[str, str], where: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Params under their wire names, and wire name -> the key the user wrote."""
    params: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in source.items():
        name = aliases.get(key)
        if name is None:
            continue
        if name in params:
            raise _Malformed(f"both {written[name]} and {where}{key} given; use one")
        params[name] = value
        written[name] = f"{where}{key}"
    return params, written


def _validate(raw: dict[str, Any], written: Mapping[str, str], prefix: str) -> P.Item:
    """protocol.validate_item, its field paths translated back to the line's own keys."""
    try:
        return P.validate_item(raw, "item")
    except P.ValidationError as exc:
        path = exc.field.removeprefix("item.").removeprefix("item")
        if path.startswith("params."):
            name = path.removeprefix("params.")
            head = re.split(r"[.\[]", name, maxsplit=1)[0]
            path = written.get(head, head) + name[len(head) :]
        elif path:
            path = f"{prefix}{path}"
        raise _Malformed(f"{path}: {exc.message}" if path else exc.message) from None


def _parse_plain(obj: dict[str, Any], line_no: int) -> BatchLine:
    for key in obj:
        if key not in _PLAIN_KEYS:
            raise _unknown_key(key, _PLAIN_KEYS)
    item_id = _check_id(obj["id"], "id") if "id" in obj else fallback_id(line_no)
    if ("prompt" in obj) == ("messages" in obj):
        raise _Malformed('needs exactly one of "prompt" or "messages"')
    params, written = _map_params(obj, PARAM_ALIASES, "")
    nested = obj.get("params")
    if nested is not None:
        if not isinstance(nested, dict):
            raise _Malformed("params must be an object")
        for key in nested:
            if key not in PARAM_ALIASES:
                raise _unknown_key(key, PARAM_ALIASES, "params.")
        inner, inner_written = _map_params(nested, PARAM_ALIASES, "params.")
        for name in inner.keys() & params.keys():
            raise _Malformed(f"both {written[name]} and {inner_written[name]} given; use one")
        params |= inner
        written |= inner_written
    raw = {"id": item_id, "params": params}
    raw |= {"prompt": obj["prompt"]} if "prompt" in obj else {"messages": obj["messages"]}
    if obj.get("timeout_s") is not None:
        raw["timeout_s"] = obj["timeout_s"]
    item = _validate(raw, written, "")
    return BatchLine(
        line_no, item.id, item.prompt, item.messages, item.params, timeout_s=item.timeout_s
    )


def _parse_openai(obj: dict[str, Any], line_no: int) -> BatchLine:
    for key in obj:
        if key not in OPENAI_LINE_KEYS:
            raise _unknown_key(key, OPENAI_LINE_KEYS)
    if "custom_id" not in obj:
        raise _Malformed("custom_id is missing (an OpenAI batch line needs one)")
    item_id = _check_id(obj["custom_id"], "custom_id")
    method = obj.get("method", "POST")
    if method != "POST":
        raise _Malformed(f'method must be "POST", got {method!r}')
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise _Malformed(f"url {url!r} is not supported (use {CHAT_URL} or {COMPLETIONS_URL})")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Malformed("body must be an object")
    _check_openai_body_keys(body, url)
    # null is "not given", as OpenAI's API and vLLM take it (clients send it for unset fields)
    body = {key: value for key, value in body.items() if value is not None}
    params, written = _map_params(body, OPENAI_PARAM_ALIASES, "body.")
    _openai_logprobs(body, url, params, written)
    _openai_echo(body, url, params, written)
    _chat_special_tokens(body, url)
    if url == CHAT_URL:
        params.pop("add_special_tokens", None)
    raw: dict[str, Any] = {"id": item_id, "params": params}
    if url == CHAT_URL:
        if "messages" not in body:
            raise _Malformed("body.messages is missing")
        raw["messages"] = _openai_messages(body["messages"])
    else:
        raw["prompt"] = _openai_prompt(body.get("prompt"))
    model = body.get("model")
    if model is not None:
        raw["model"] = model
    item = _validate(raw, written, "body.")
    return BatchLine(
        line_no,
        item.id,
        item.prompt,
        item.messages,
        item.params,
        url=url,
        model=item.model,
    )


def _openai_logprobs(
    body: Mapping[str, Any], url: str, params: dict[str, Any], written: dict[str, str]
) -> None:
    """``logprobs``: on chat a bool (alternatives: ``top_logprobs``); on completions
    the number of alternatives (0-5), the chosen token's logprob always included."""
    value = body.get("logprobs")
    if value is None:
        return
    written["logprobs"] = "body.logprobs"
    if url == CHAT_URL or isinstance(value, bool):
        params["logprobs"] = value
        return
    if "top_logprobs" in params:
        raise _Malformed("body.top_logprobs: not a completions field; logprobs: N asks for N")
    if type(value) is not int or not 0 <= value <= COMPLETIONS_MAX_LOGPROBS:
        raise _Malformed(f"body.logprobs: must be an integer 0-{COMPLETIONS_MAX_LOGPROBS}")
    params["logprobs"] = True
    params["top_logprobs"] = value
    written["top_logprobs"] = "body.logprobs"


def _chat_special_tokens(body: Mapping[str, Any], url: str) -> None:
    """A chat's prompt is its template's text, special tokens and all (vLLM's default);
    adding a BOS before it is not something this server does."""
    if url == CHAT_URL and body.get("add_special_tokens") is True:
        raise _Malformed("body.add_special_tokens: only false on chat (the template carries them)")


def _openai_echo(
    body: Mapping[str, Any], url: str, params: dict[str, Any], written: dict[str, str]
) -> None:
    """``echo`` (completions): the prompt comes back before the text, and with
    ``logprobs: N`` so do its tokens' logprobs (the loglikelihood request)."""
    value = body.get("echo")
    if value is None or value is False:
        return
    if url == CHAT_URL:
        raise _Malformed("body.echo: a completions field (chat answers do not repeat the prompt)")

    params["echo"] = value
    written["echo"] = "body.echo"
    if "top_logprobs" in params and "prompt_logprobs" not in params:
        params["prompt_logprobs"] = params["top_logprobs"]
        written["prompt_logprobs"] = "body.logprobs"


def _check_openai_body_keys(body: Mapping[str, Any], url: str) -> None:
    text_key = "messages" if url == CHAT_URL else "prompt"
    known = (
        {text_key, "model", "logprobs", "echo"}
        | OPENAI_PARAM_ALIASES.keys()
        | OPENAI_IGNORED
        | OPENAI_NEUTRAL.keys()
    )
    for key, value in body.items():
        if key in OPENAI_NEUTRAL:
            allowed, reason = OPENAI_NEUTRAL[key]
            if not _is_neutral(key, value, allowed):
                raise _Malformed(f"body.{key}={json.dumps(value)}: {reason}")
        elif key not in known:
            raise _unknown_key(key, known, "body.")


def _is_neutral(key: str, value: Any, allowed: tuple[Any, ...]) -> bool:
    if key in ("logit_bias", "tools", "functions") and value in ({}, []):
        return True
    # `in` compares with ==, so 1.0 passes as 1; but true must not pass as 1.
    return any((value == a and type(value) is not bool) or value is a for a in allowed)


def _openai_messages(value: Any) -> Any:
    """Messages with content-part lists flattened to text; other shapes left to validation."""
    if not isinstance(value, list):
        return value
    out = []
    for i, msg in enumerate(value):
        if isinstance(msg, dict) and isinstance(msg.get("content"), list):
            msg = {**msg, "content": _join_text_parts(msg["content"], i)}
        if isinstance(msg, dict):
            msg = {k: v for k, v in msg.items() if k != "name"}  # names don't reach templates
        out.append(msg)
    return out


def _join_text_parts(parts: list[Any], index: int) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else _json_type(part)
            raise _Malformed(
                f"body.messages[{index}].content: only text parts are supported, got {kind!r}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _Malformed(f"body.messages[{index}].content: a text part's text must be a string")
        texts.append(text)
    return "".join(texts)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _openai_prompt(value: Any) -> Any:
    """A completions prompt: a string or token ids, or a list holding exactly one of
    them (several prompts are the HTTP endpoint's to split); shapes left to validation."""
    if _token_ids(value):
        return value
    if isinstance(value, list):
        if len(value) == 1 and (isinstance(value[0], str) or _token_ids(value[0])):
            return value[0]
        if len(value) > 1 and all(isinstance(p, str | list) for p in value):
            raise _Malformed(
                "body.prompt: one prompt per line is supported in a batch file (a list of "
                "prompts over HTTP)"
            )
        raise _Malformed("body.prompt: must be a string, token ids (integers), or a list of either")
    if value is None:
        raise _Malformed("body.prompt is missing")
    return value


# --- writing ---------------------------------------------------------------------


class ResultLike(Protocol):
    """What the writer needs of an ``exgen.client.Result``."""

    id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def error(self) -> Any: ...


# An OpenAI line's failure as an HTTP answer would have it: (status, error type). The
# codes not here (cancelled, timeout) are not answers of the API but of the batch
# run, and go in the line's "error" with "response": null, as OpenAI's batch does.
OPENAI_HTTP_ERRORS: dict[str, tuple[int, str]] = {
    P.E_BAD_REQUEST: (400, "invalid_request_error"),
    P.E_PROMPT_TOO_LONG: (400, "invalid_request_error"),
    P.E_MODEL_NOT_FOUND: (404, "invalid_request_error"),
    P.E_TOO_LARGE: (500, "server_error"),
    P.E_WORKER_DIED: (500, "server_error"),
    P.E_ENGINE: (500, "server_error"),
    P.E_INTERNAL: (500, "server_error"),
}


# exgen's codes that OpenAI spells its own way (in batch output and HTTP answers alike).
OPENAI_ERROR_CODES = {P.E_PROMPT_TOO_LONG: "context_length_exceeded"}


def param_in_message(message: str) -> str | None:
    """The body field a parser message is about (``body.'temprature'``, ``body.n=2``,
    ``body.messages[0].content: ...``): the request field it names first."""
    found = re.search(r"body\.'?([A-Za-z_]\w*)", message)
    return found.group(1) if found else None


def prompt_field(url: str | None) -> str:
    """The request field that holds the prompt: what a too-long prompt's error names."""
    return "messages" if url == CHAT_URL else "prompt"


def _error_object(error: Any) -> dict[str, Any]:
    code = getattr(error, "code", P.E_INTERNAL)
    message = getattr(error, "message", None) or str(error)
    return {"code": str(code), "message": str(message)}


def format_result(
    line: BatchLine,
    result: ResultLike,
    *,
    now: float | None = None,
    default_model: str = DEFAULT_MODEL_NAME,
) -> dict[str, Any]:
    """The output line for one result, in the shape of its input line.

    OpenAI bodies name the model that wrote the text: the result's (the daemon's
    served model), else ``default_model`` (the CLI passes the daemon's status).
    """
    error = None if result.error is None else _error_object(result.error)
    if not line.is_openai:
        record = {
            "id": line.id,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "error": error,
        }
        return _add_samples(record, result)
    if error is not None:
        return _openai_failure(line, error, getattr(result.error, "field", None))
    created = int(time.time() if now is None else now)
    model = getattr(result, "model", None) or default_model
    body = _openai_body(line, result, created, model)
    return _openai_line(line.id, _openai_response(200, body), None)


def _openai_failure(line: BatchLine, error: dict[str, Any], field: str | None) -> dict[str, Any]:
    """A failed OpenAI line in the shape of OpenAI's batch error file."""
    http = OPENAI_HTTP_ERRORS.get(error["code"])
    if http is None:
        return _openai_line(line.id, None, error)
    status, kind = http
    param = field.removeprefix("params.") if field else None
    if error["code"] == P.E_MODEL_NOT_FOUND:
        param = "model"
    elif error["code"] == P.E_PROMPT_TOO_LONG:
        param = prompt_field(line.url)
    code = OPENAI_ERROR_CODES.get(error["code"], error["code"])
    body = {"error": {"message": error["message"], "type": kind, "param": param, "code": code}}
    return _openai_line(line.id, _openai_response(status, body), None)


def _openai_response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body}


def _openai_line(
    custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _samples(result: ResultLike) -> list[tuple[str, Any, Any]]:
    """(text, finish_reason, logprobs) of each of the result's n samples."""
    choices = getattr(result, "choices", None)
    if choices:
        return [(c.text, c.finish_reason, c.logprobs) for c in choices]
    return [(result.text, result.finish_reason, getattr(result, "logprobs", None))]


def _plain_logprobs(logprobs: Any) -> list[dict[str, Any]]:
    return [
        {
            "token": token,
            "logprob": lp,
            "top_logprobs": [{"token": t, "logprob": v} for t, v in top],
        }
        for token, lp, top in logprobs
    ]


def _add_samples(record: dict[str, Any], result: ResultLike) -> dict[str, Any]:
    """A plain line's logprobs, n > 1 samples and prompt (echo, prompt_logprobs), where
    it asked for them."""
    logprobs = getattr(result, "logprobs", None)
    if logprobs is not None:
        record["logprobs"] = _plain_logprobs(logprobs)
    prompt = getattr(result, "prompt", None)
    if prompt is not None:
        record["prompt"] = {"ids": prompt.ids, "text": prompt.text, "logprobs": prompt.logprobs}
    choices = getattr(result, "choices", None)
    if choices and len(choices) > 1:
        record["choices"] = [
            {
                "text": c.text,
                "finish_reason": c.finish_reason,
                "completion_tokens": c.completion_tokens,
            }
            | ({} if c.logprobs is None else {"logprobs": _plain_logprobs(c.logprobs)})
            for c in choices
        ]
    return record


def _chat_logprobs(logprobs: Any) -> dict[str, Any]:
    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    content = [
        entry(token, lp) | {"top_logprobs": [entry(t, v) for t, v in top]}
        for token, lp, top in logprobs
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(
    logprobs: Any, top_wanted: bool, prompt: list[list[Any]] | None = None
) -> dict[str, Any]:
    """OpenAI's completions logprobs; with echo, the prompt's tokens first (the first
    one's logprob and alternatives null, as OpenAI's)."""
    rows = [(p[1], p[2], None if p[2] is None else [a[1:] for a in p[4]]) for p in prompt or ()]
    rows += [(token, lp, top) for token, lp, top in logprobs]
    offsets, offset = [], 0
    for token, _, _ in rows:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": [token for token, _, _ in rows],
        "token_logprobs": [lp for _, lp, _ in rows],
        "top_logprobs": [None if t is None else dict(t) for _, _, t in rows]
        if top_wanted
        else None,
        "text_offset": offsets,
    }


def _openai_choice(
    line: BatchLine, index: int, sample: tuple[str, Any, Any], prompt: Any = None
) -> dict[str, Any]:
    text, finish_reason, logprobs = sample
    if logprobs is None and (line.params.get("logprobs") or line.params.get("top_logprobs")):
        logprobs = []  # asked, and no token generated (max_tokens 0)
    choice: dict[str, Any] = {"index": index}
    if line.url == CHAT_URL:
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = None if logprobs is None else _chat_logprobs(logprobs)
    else:
        top = bool(line.params.get("top_logprobs"))
        echoed = prompt if line.params.get("echo") else None
        choice["text"] = text if echoed is None else _prompt_text(line, echoed) + text
        if logprobs is not None:
            prompt_entries = getattr(echoed, "logprobs", None) or []
            choice["logprobs"] = _completion_logprobs(logprobs, top, prompt_entries)
        else:
            choice["logprobs"] = None
        if getattr(prompt, "logprobs", None) is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(prompt.logprobs)
    choice["finish_reason"] = finish_reason
    return choice


def _prompt_text(line: BatchLine, prompt: Any) -> str:
    """The echoed prompt: as the request wrote it, or its token ids' text."""
    return line.prompt if isinstance(line.prompt, str) else str(prompt.text)


def vllm_prompt_logprobs(entries: list[list[Any]]) -> list[dict[str, Any] | None]:
    """vLLM's prompt_logprobs: per prompt token, {token id: {logprob, rank,
    decoded_token}} for it and its alternatives; None for the first token."""
    out: list[dict[str, Any] | None] = []
    for token, piece, logprob, rank, alternatives in entries:
        if logprob is None:
            out.append(None)
            continue
        position = {str(token): {"logprob": logprob, "rank": rank, "decoded_token": piece}}
        for place, (alt, alt_piece, alt_lp) in enumerate(alternatives, 1):
            position.setdefault(
                str(alt), {"logprob": alt_lp, "rank": place, "decoded_token": alt_piece}
            )
        out.append(position)
    return out


def _openai_body(line: BatchLine, result: ResultLike, created: int, model: str) -> dict[str, Any]:
    chat = line.url == CHAT_URL
    prompt = getattr(result, "prompt", None)
    choices = [_openai_choice(line, i, s, prompt) for i, s in enumerate(_samples(result))]
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }
    entries = getattr(prompt, "logprobs", None)
    if chat and entries is not None:  # vLLM's place for a chat's (completions: a choice's)
        body["prompt_logprobs"] = vllm_prompt_logprobs(entries)
    return body


def format_line_error(err: LineError) -> dict[str, Any]:
    """The output line answering a malformed input line; an OpenAI line's as the 400
    the same body gets from the HTTP endpoint (plus the line's number)."""
    error = {"code": P.E_BAD_REQUEST, "message": str(err), "line": err.line_no}
    if err.is_openai:
        status, kind = OPENAI_HTTP_ERRORS[P.E_BAD_REQUEST]
        param = param_in_message(err.message)
        body = {"error": {"message": str(err), "type": kind, "param": param, **error}}
        return _openai_line(err.id, _openai_response(status, body), None)
    return {
        "id": err.id,
        "text": "",
        "finish_reason": P.FINISH_ERROR,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "error": error,
    }


class WriteFailed(Exception):
    """An output file could not be written (disk full, I/O error, closed pipe)."""

    def __init__(self, name: str, cause: OSError) -> None:
        super().__init__(f"cannot write {name}: {cause.strerror or cause}")
        self.name = name
        self.cause = cause


class ResultWriter:
    """Writes one JSON line per answer and flushes it, so a crash loses nothing written.

    With ``errors`` given, failed lines (and malformed ones) go there instead.
    """

    def __init__(
        self,
        stream: IO[str],
        *,
        errors: IO[str] | None = None,
        default_model: str = DEFAULT_MODEL_NAME,
    ) -> None:
        self.stream = stream
        self.errors = errors
        self.default_model = default_model

    def write(self, record: Mapping[str, Any], stream: IO[str] | None = None) -> None:
        out = self.stream if stream is None else stream
        try:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
        except OSError as exc:
            raise WriteFailed(getattr(out, "name", "the output"), exc) from exc

    def write_result(self, line: BatchLine, result: ResultLike) -> None:
        failed = result.error is not None
        record = format_result(line, result, default_model=self.default_model)
        self.write(record, self.errors if failed else None)

    def write_line_error(self, err: LineError) -> None:
        self.write(format_line_error(err), self.errors)


# --- resume ----------------------------------------------------------------------


@dataclass(slots=True)
class ResumeState:
    """What prepare_resume found in an earlier output file."""

    done: set[str] = field(default_factory=set)  # ids with a successful result
    dropped_errors: int = 0  # error lines removed, to be retried
    dropped_partial: bool = False  # a truncated last line was removed
    unreadable: int = 0  # complete lines that are not ours; kept as they are


def output_record_status(record: Any) -> tuple[str, bool] | None:
    """(id, succeeded) for one output record of either shape; None if not ours."""
    if not isinstance(record, dict):
        return None
    if "custom_id" in record:
        item_id = record.get("custom_id")
        response = record.get("response")
        ok = (
            record.get("error") is None
            and isinstance(response, dict)
            and response.get("status_code") == 200
        )
    else:
        item_id = record.get("id")
        ok = "error" in record and record["error"] is None
    return (item_id, ok) if isinstance(item_id, str) else None


def prepare_resume(path: str | Path) -> ResumeState:
    """Ready an earlier output file for appending; return the ids already done.

    A last line without its newline is what a run killed mid-write leaves: it is cut
    off. Error lines are removed so that their ids run again (a resumed run retries
    failures) and each id ends up in the file once. A missing file is an empty one.
    """
    path = Path(path)
    state = ResumeState()
    if not path.exists():
        return state
    keep_end = 0  # byte offset just past the last complete line
    must_rewrite = False
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                state.dropped_partial = True
                break
            keep_end += len(raw)
            status = _line_status(raw)
            if status is None:
                state.unreadable += bool(raw.strip())
            elif status[1]:
                state.done.add(status[0])
            else:
                state.dropped_errors += 1
                must_rewrite = True
    if must_rewrite:
        _rewrite_without_errors(path, keep_end)
    elif state.dropped_partial:
        os.truncate(path, keep_end)
    if state.unreadable:
        logger.warning(
            "%s: %d lines are not exgen results; kept as they are", path, state.unreadable
        )
    return state


def _line_status(raw: bytes) -> tuple[str, bool] | None:
    try:
        return output_record_status(json.loads(raw))
    except ValueError:
        return None


def _rewrite_without_errors(path: Path, keep_end: int) -> None:
    """Copy the file without its error lines (and without bytes past keep_end), atomically."""
    tmp = path.with_name(path.name + ".resume-tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        offset = 0
        for raw in src:
            offset += len(raw)
            if offset > keep_end:
                break
            status = _line_status(raw)
            if status is None or status[1]:
                dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
