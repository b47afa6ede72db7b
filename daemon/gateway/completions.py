"""``/v1/completions`` and ``/v1/chat/completions``: a body in, one item to the router,
an OpenAI response (or server-sent chunks) out.

A request body is mapped by :mod:`exgen.client.openai_body`, as an OpenAI Batch
line's body is: the same fields mapped, the same ones refused with the same messages,
so a request that works here works in a batch file and back. Only ``stream`` and
``stream_options`` are taken off first: streaming is this endpoint's business.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from exgen.client import errors
from exgen.client import openai_body as O
from exgen.client.calls import StreamText
from exgen.client.client import Result
from exgen.daemon.gateway.errors import ApiError, bad_body, from_exgen_error, from_request_failed
from exgen.daemon.gateway.upstream import Upstream

logger = logging.getLogger("exgen.gateway.completions")

STREAM_END = b"data: [DONE]\n\n"
MAX_PROMPTS = 256  # prompts in one /v1/completions request (each is an item)


@dataclass(slots=True)
class Parsed:
    url: str  # the endpoint: openai_body.CHAT_URL or COMPLETIONS_URL
    item: dict[str, Any]  # the body as an item: id, prompt or messages, params, model
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # usage on every chunk (vLLM's continuous_usage_stats)
    # /v1/completions with a list of prompts: one item each (``item`` is the first)
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        """The request's id: its response's, and its (first) item's."""
        return str(self.item["id"])

    @property
    def chat(self) -> bool:
        return self.url == O.CHAT_URL


def parse_body(raw: bytes, url: str) -> Parsed:
    """The request, or an ApiError (400 naming the field)."""
    body = json_object(raw)
    stream = body.pop("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream must be true or false", param="stream")
    include_usage, continuous = _stream_options(body.pop("stream_options", None))
    request_id = f"{'chatcmpl' if url == O.CHAT_URL else 'cmpl'}-{uuid.uuid4().hex}"
    prompts = several_prompts(body) if url == O.COMPLETIONS_URL else None
    if prompts is None:
        items = [_item(body, url, request_id, raw)]
    else:
        # One item a prompt (ids: the request's, numbered).
        items = [
            _item(body | {"prompt": p}, url, f"{request_id}-{i}", raw)
            for i, p in enumerate(prompts)
        ]
        if stream:
            raise ApiError(
                400, "several prompts are not supported with stream: true", param="prompt"
            )
    if stream:
        _check_streamable(items[0]["params"])
    return Parsed(url, items[0], bool(stream), include_usage, include_usage and continuous, items)


def several_prompts(body: dict[str, Any]) -> list[Any] | None:
    """The prompts of a completions body holding several (strings, or lists of token
    ids); None for one prompt, which item_from_body takes (and refuses what is neither)."""
    prompts = body.get("prompt")
    if not isinstance(prompts, list) or len(prompts) < 2:
        return None
    if not all(isinstance(p, str | list) for p in prompts):
        return None  # one prompt of token ids, or a shape item_from_body names
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request", param="prompt")
    return prompts


def _item(body: dict[str, Any], url: str, item_id: str, raw: bytes) -> dict[str, Any]:
    try:
        return O.item_from_body(body, url, item_id, raw=raw)
    except O.Malformed as exc:
        raise bad_body(str(exc)) from None


def _check_streamable(params: dict[str, Any]) -> None:
    """A stream carries one sample's text: n > 1 and logprobs are for whole answers."""
    if params.get("n", 1) > 1:
        raise ApiError(400, "n > 1 is not supported with stream: true", param="n")
    if params.get("logprobs") or params.get("top_logprobs"):
        raise ApiError(400, "logprobs are not supported with stream: true", param="logprobs")
    for name in ("echo", "prompt_logprobs"):  # the prompt comes back with a whole answer
        value = params.get(name)
        if value is not None and value is not False:  # prompt_logprobs 0 is asked too
            raise ApiError(400, f"{name} is not supported with stream: true", param=name)


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object")
    return body


# stream_options' fields: OpenAI's, and vLLM's continuous_usage_stats (usage on every
# chunk, when include_usage is on too, as vLLM has it). include_obfuscation pads
# chunks against length side channels on OpenAI's service; there is none to pad here.
STREAM_OPTIONS = ("include_usage", "continuous_usage_stats", "include_obfuscation")


def _stream_options(options: Any) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats); an unknown or non-bool field is a 400."""
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    for key, value in options.items():
        if key not in STREAM_OPTIONS:
            known = ", ".join(STREAM_OPTIONS)
            raise ApiError(400, f"stream_options.{key}: unknown (known: {known})", param=key)
        if not isinstance(value, bool) and value is not None:
            raise ApiError(400, f"stream_options.{key} must be true or false", param=key)
    return bool(options.get("include_usage")), bool(options.get("continuous_usage_stats"))


def with_deadline(item: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """The item with the router's deadline: past it the item is cancelled and answered
    timeout. (Its model, where the request named one, is the router's strict_model's
    to check.)"""
    return item if timeout_s is None else item | {"timeout_s": timeout_s}


def response_body(
    url: str, item: dict[str, Any], result: Result, served_model: str
) -> dict[str, Any]:
    """The OpenAI response object for one item, under the item's id, naming the served
    model (the one that wrote the text), whatever model the request named."""
    body = O.response_body(url, item, result, default_model=served_model)
    body["id"] = item["id"]
    return body


def merged(bodies: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    """One response for several prompts: their choices in prompt order, numbered
    across them (prompt i's n samples are i*n .. i*n+n-1), their usage summed."""
    body = bodies[0]
    body["id"] = request_id
    if len(bodies) == 1:
        return body
    choices = [c for b in bodies for c in b["choices"]]
    for index, choice in enumerate(choices):
        choice["index"] = index
    body["choices"] = choices
    body["usage"] = O.summed_usage([b["usage"] for b in bodies])
    return body


class ChunkWriter:
    """Server-sent events in OpenAI's chunk format for one streamed request."""

    def __init__(self, parsed: Parsed, model: str) -> None:
        self.parsed = parsed
        self.counts = (0, 0)  # (prompt, completion) tokens so far: continuous usage
        self.head: dict[str, Any] = {
            "id": parsed.id,
            "object": "chat.completion.chunk" if parsed.chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        if self.parsed.include_usage and "usage" not in extra:
            extra["usage"] = None  # as OpenAI: null on every chunk but the last
        doc = {**self.head, "choices": choices, **extra}
        return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.parsed.chat:
            delta = {} if text is None else {"content": text}
            out: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            out = {"index": 0, "text": text or ""}
        out["logprobs"] = None
        out["finish_reason"] = finish_reason
        return out

    def _usage_so_far(self, text: str | None = None) -> dict[str, Any]:
        """Continuous usage: the counts the engine sent with this text (a text without
        them, the last counts seen); nothing without continuous_usage_stats."""
        if not self.parsed.continuous_usage:
            return {}
        prompt, completion = self.counts
        if isinstance(text, StreamText) and text.prompt_tokens:
            prompt, completion = text.prompt_tokens, text.completion_tokens
            self.counts = (prompt, completion)
        total = prompt + completion
        counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
        return {"usage": counts}

    def first(self, first: str | Result) -> bytes:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.parsed.chat:
            return b""
        if isinstance(first, StreamText | Result) and first.prompt_tokens:
            self.counts = (first.prompt_tokens, 0)
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        return self._event(
            [{**choice, "logprobs": None, "finish_reason": None}], **self._usage_so_far()
        )

    def text(self, text: str) -> bytes:
        return self._event([self._choice(text, None)], **self._usage_so_far(text))

    def last(self, result: Result) -> bytes:
        whole = {"usage": O.usage(result)} if self.parsed.continuous_usage else {}
        out = self._event([self._choice(None, result.finish_reason)], **whole)
        if self.parsed.include_usage:
            out += self._event([], usage=O.usage(result))
        return out + STREAM_END

    def error(self, exc: ApiError) -> bytes:
        doc = json.dumps(exc.body(), ensure_ascii=False).encode()
        return b"data: " + doc + b"\n\n" + STREAM_END


class Completions:
    """Runs parsed requests on the router, on the shared client: the router holds the
    deadline (``timeout_s``: a 504 when it passes) and the model check (strict_model:
    a 404); a caller that goes away cancels the call, and with it the item."""

    def __init__(self, upstream: Upstream, timeout_s: float) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s

    async def complete(self, parsed: Parsed) -> dict[str, Any]:
        """One whole response, or an ApiError."""
        items = parsed.items or [parsed.item]
        try:
            results = await self.upstream.client.generate(
                [with_deadline(item, self.timeout_s) for item in items]
            )
        except errors.ExgenError as exc:
            raise from_exgen_error(exc, parsed.url) from None
        for result in results:
            if result.error is not None:  # one prompt failed: the request did, as vLLM's
                raise from_request_failed(result.error, parsed.url)
        bodies = [
            response_body(parsed.url, item, r, self.upstream.model)
            for item, r in zip(items, results, strict=True)
        ]
        return merged(bodies, parsed.id)

    def stream(self, parsed: Parsed) -> AsyncGenerator[str | Result, None]:
        """Text chunks, then the Result; a failure raises an ExgenError."""
        item = with_deadline(parsed.item, self.timeout_s)
        return self.upstream.client.stream_with_result(item)
