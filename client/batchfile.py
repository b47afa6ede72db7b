"""Batch files: ``prompts.jsonl`` in, ``results.jsonl`` out. Pure: no sockets.

Input, one JSON object a line (blank lines are skipped; line numbers count them):

* plain  ``{"id"?, "prompt": "...", <params>...}``
* chat   ``{"id"?, "messages": [{"role", "content"}...], <params>...}``
* OpenAI Batch API ``{"custom_id", "method": "POST", "url", "body": {...}}`` with url
  ``/v1/chat/completions`` (body ``messages``) or ``/v1/completions`` (body ``prompt``).

Params of plain and chat lines sit at the top level (or in a ``"params"`` map) under
the names of :data:`protocol.PARAM_NAMES`; ``max_tokens`` is an alias of
``max_new_tokens``. ``timeout_s`` (top level) is the line's deadline in seconds. An
OpenAI line's body is mapped by :mod:`openai_body`, as the HTTP gateway maps a request
body. A line's params override the command line's defaults.

Strictness, on purpose: an unknown key rejects the line with a message naming it (a
typo like ``temprature`` must not silently run a whole file greedily); so does an
OpenAI body field that would change the text and that exgen cannot honour.

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
``"prompt": {"ids", "text", "logprobs"}``. Timing and slot are left out so that two
greedy runs give identical files. OpenAI lines get the OpenAI batch output shape
(:func:`format_result`), with :mod:`openai_body`'s response body: ``body.model`` is the model
the daemon serves, whatever the line asked for; a failed OpenAI line has OpenAI's
error-file shape (``response.status_code`` 400/404/500 with ``body.error``; a
cancelled or timed-out line ``response: null`` and ``error``). A malformed line is
answered with an error whose object also carries ``"line"``.

Resume (:func:`prepare_resume`): ids with a successful result count as done; error
lines and a truncated last line are removed, so a resumed run retries failures and
each id ends up in the file exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from exgen.client import protocol as P
from exgen.client.openai_body import (
    CHAT_URL,
    COMPLETIONS_URL,
    DEFAULT_MODEL_NAME,
    OPENAI_HTTP_ERRORS,
    OPENAI_URLS,
    ResultLike,
    error_response,
    item_from_body,
    param_in_message,
    response_body,
)
from exgen.client.user_items import (
    Malformed,
    check_encodable,
    check_id,
    json_type,
    map_params,
    unknown_key,
    validate,
)

logger = logging.getLogger(__name__)

# Names a plain/chat line may use for a param, mapped to the wire name.
PARAM_ALIASES: dict[str, str] = {name: name for name in P.PARAM_NAMES} | {
    "max_tokens": "max_new_tokens"
}
_PLAIN_KEYS = frozenset({"id", "prompt", "messages", "params", "timeout_s"}) | frozenset(
    PARAM_ALIASES
)

OPENAI_LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})


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
        message = f"must be a JSON object, got {json_type(obj)}"
        return LineError(line_no, message, fallback_id(line_no), openai_default)
    is_openai = bool(OPENAI_LINE_KEYS & obj.keys())
    item_id = _usable_id(obj.get("custom_id" if is_openai else "id"), line_no)
    try:
        check_encodable(obj, raw)
        if is_openai:
            return _parse_openai(obj, line_no, raw)
        return _parse_plain(obj, line_no)
    except Malformed as exc:
        return LineError(line_no, str(exc), item_id, is_openai)


def _usable_id(value: Any, line_no: int) -> str:
    if isinstance(value, str) and value and len(value) <= P.MAX_ID_CHARS:
        return value
    return fallback_id(line_no)


def _parse_plain(obj: dict[str, Any], line_no: int) -> BatchLine:
    for key in obj:
        if key not in _PLAIN_KEYS:
            raise unknown_key(key, _PLAIN_KEYS)
    item_id = check_id(obj["id"], "id") if "id" in obj else fallback_id(line_no)
    if ("prompt" in obj) == ("messages" in obj):
        raise Malformed('needs exactly one of "prompt" or "messages"')
    params, written = map_params(obj, PARAM_ALIASES, "")
    nested = obj.get("params")
    if nested is not None:
        if not isinstance(nested, dict):
            raise Malformed("params must be an object")
        for key in nested:
            if key not in PARAM_ALIASES:
                raise unknown_key(key, PARAM_ALIASES, "params.")
        inner, inner_written = map_params(nested, PARAM_ALIASES, "params.")
        for name in inner.keys() & params.keys():
            raise Malformed(f"both {written[name]} and {inner_written[name]} given; use one")
        params |= inner
        written |= inner_written
    raw = {"id": item_id, "params": params}
    raw |= {"prompt": obj["prompt"]} if "prompt" in obj else {"messages": obj["messages"]}
    if obj.get("timeout_s") is not None:
        raw["timeout_s"] = obj["timeout_s"]
    item = validate(raw, written, "")
    return BatchLine(
        line_no, item.id, item.prompt, item.messages, item.params, timeout_s=item.timeout_s
    )


def _parse_openai(obj: dict[str, Any], line_no: int, raw: bytes | str) -> BatchLine:
    for key in obj:
        if key not in OPENAI_LINE_KEYS:
            raise unknown_key(key, OPENAI_LINE_KEYS)
    if "custom_id" not in obj:
        raise Malformed("custom_id is missing (an OpenAI batch line needs one)")
    item_id = check_id(obj["custom_id"], "custom_id")
    method = obj.get("method", "POST")
    if method != "POST":
        raise Malformed(f'method must be "POST", got {method!r}')
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise Malformed(f"url {url!r} is not supported (use {CHAT_URL} or {COMPLETIONS_URL})")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise Malformed("body must be an object")
    item = item_from_body(body, url, item_id, raw=raw)
    return BatchLine(
        line_no,
        item["id"],
        item.get("prompt"),
        item.get("messages"),
        item["params"],
        url=url,
        model=item.get("model"),
    )


# --- writing ---------------------------------------------------------------------


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
    body = response_body(
        str(line.url), line.to_item(), result, default_model=default_model, created=now
    )
    return _openai_line(line.id, _openai_response(200, body), None)


def _openai_failure(line: BatchLine, error: dict[str, Any], field: str | None) -> dict[str, Any]:
    """A failed OpenAI line in the shape of OpenAI's batch error file: the HTTP answer
    the request would have had, or for a run's own outcome (cancelled, timed out)
    ``response: null`` and the error."""
    answer = error_response(line.url, error["code"], error["message"], field)
    if answer is None:
        return _openai_line(line.id, None, error)
    return _openai_line(line.id, _openai_response(*answer), None)


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
