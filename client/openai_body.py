"""OpenAI request bodies to items, and results back to OpenAI response bodies: the one
mapping that the batch file reader (an OpenAI Batch API line's ``body``) and the HTTP
gateway (``/v1/completions``, ``/v1/chat/completions``) share, so that a request that
works over HTTP works in a batch file, and back. Dicts in, dicts out; pure.

* :func:`item_from_body`: a body (a dict, as JSON parsed it) and its endpoint's url ->
  the item to send (the dict ``Client.generate`` takes), or :class:`Malformed` naming
  the field (``body.'temprature'``, ``body.messages[0].content: ...``).
* :func:`response_body`: the item, its result and the model that served it -> the
  ``chat.completion`` / ``text_completion`` object.
* :func:`error_response`: a failed item -> the HTTP status and ``{"error": ...}`` body
  OpenAI's API answers (None for an outcome that is not an API answer: cancelled,
  timed out).

``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``n``, ``presence_penalty``, ``frequency_penalty``, ``response_format``
(``json_object``, ``json_schema``: the output is constrained to it) and ``logprobs`` /
``top_logprobs`` (chat: a bool and a count; completions: ``logprobs: N`` asks for N
alternatives) are mapped, and the common extensions ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``skip_special_tokens`` and
``include_stop_str_in_output`` are accepted as vLLM does.

Strictness, on purpose: an unknown field is refused naming it (a typo like
``temprature`` must not silently run a whole file greedily). Fields that cannot change
the text (``user``, ``metadata``, ``store``, ``service_tier``, ...) are ignored;
``model`` is sent with the item (a daemon with ``strict_model`` refuses another model,
as a 404); fields that would change it and that exgen cannot honour (``best_of`` > 1,
``stream``, ``tools``, ``logit_bias``, ...) are refused unless they hold their neutral
value (``best_of: 1``, ``stream: false``, ...). A null field is one not given.

Answers carry n choices and OpenAI's logprobs shapes (chat: ``logprobs.content``;
completions: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), and
vLLM's ``prompt_logprobs`` where asked.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from exgen.client import protocol as P
from exgen.client.user_items import (
    Malformed,
    check_encodable,
    json_type,
    map_params,
    unknown_key,
    validate,
)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OPENAI_URLS = (CHAT_URL, COMPLETIONS_URL)
DEFAULT_MODEL_NAME = "exgen"  # an answer's "model" when neither the result nor the caller names one

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
    # logprobs: a bool on chat, a count on completions (see _logprobs)
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
    # echo: completions only (see _echo)
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
# request is refused with the reason given.
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
COMPLETIONS_MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs


# --- bodies to items ------------------------------------------------------------


def item_from_body(
    body: Mapping[str, Any], url: str, item_id: str, *, raw: bytes | str | None = None
) -> dict[str, Any]:
    """The item a request body asks for at ``url`` (CHAT_URL or COMPLETIONS_URL), under
    ``item_id``: ``{"id", "params", "messages" or "prompt", "model"?}``, checked as the
    router checks it. ``raw``: the JSON text the body was parsed from, where it is at
    hand (it spares the search for lone surrogates when it has no escape that makes one).
    Raises :class:`Malformed` naming the body's field. ``body`` is left as it is."""
    if url not in OPENAI_URLS:
        raise Malformed(f"url {url!r} is not supported (use {CHAT_URL} or {COMPLETIONS_URL})")
    check_encodable(body, raw, "body")
    _check_body_keys(body, url)
    # null is "not given", as OpenAI's API and vLLM take it (clients send it for unset fields)
    body = {key: value for key, value in body.items() if value is not None}
    params, written = map_params(body, OPENAI_PARAM_ALIASES, "body.")
    _logprobs(body, url, params, written)
    _echo(body, url, params, written)
    _chat_special_tokens(body, url)
    if url == CHAT_URL:
        params.pop("add_special_tokens", None)
    item: dict[str, Any] = {"id": item_id, "params": params}
    if url == CHAT_URL:
        if "messages" not in body:
            raise Malformed("body.messages is missing")
        item["messages"] = _messages(body["messages"])
    else:
        item["prompt"] = _prompt(body.get("prompt"))
    model = body.get("model")
    if model is not None:
        item["model"] = model
    return validate(item, written, "body.").to_wire()


def _logprobs(
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
        raise Malformed("body.top_logprobs: not a completions field; logprobs: N asks for N")
    if type(value) is not int or not 0 <= value <= COMPLETIONS_MAX_LOGPROBS:
        raise Malformed(f"body.logprobs: must be an integer 0-{COMPLETIONS_MAX_LOGPROBS}")
    params["logprobs"] = True
    params["top_logprobs"] = value
    written["top_logprobs"] = "body.logprobs"


def _chat_special_tokens(body: Mapping[str, Any], url: str) -> None:
    """A chat's prompt is its template's text, special tokens and all (vLLM's default);
    adding a BOS before it is not something this server does."""
    if url == CHAT_URL and body.get("add_special_tokens") is True:
        raise Malformed("body.add_special_tokens: only false on chat (the template carries them)")


def _echo(
    body: Mapping[str, Any], url: str, params: dict[str, Any], written: dict[str, str]
) -> None:
    """``echo`` (completions): the prompt comes back before the text, and with
    ``logprobs: N`` so do its tokens' logprobs (the loglikelihood request)."""
    value = body.get("echo")
    if value is None or value is False:
        return
    if url == CHAT_URL:
        raise Malformed("body.echo: a completions field (chat answers do not repeat the prompt)")

    params["echo"] = value
    written["echo"] = "body.echo"
    if "top_logprobs" in params and "prompt_logprobs" not in params:
        params["prompt_logprobs"] = params["top_logprobs"]
        written["prompt_logprobs"] = "body.logprobs"


def _check_body_keys(body: Mapping[str, Any], url: str) -> None:
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
                raise Malformed(f"body.{key}={json.dumps(value)}: {reason}")
        elif key not in known:
            raise unknown_key(key, known, "body.")


def _is_neutral(key: str, value: Any, allowed: tuple[Any, ...]) -> bool:
    if key in ("logit_bias", "tools", "functions") and value in ({}, []):
        return True
    # `in` compares with ==, so 1.0 passes as 1; but true must not pass as 1.
    return any((value == a and type(value) is not bool) or value is a for a in allowed)


def _messages(value: Any) -> Any:
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
            kind = part.get("type") if isinstance(part, dict) else json_type(part)
            raise Malformed(
                f"body.messages[{index}].content: only text parts are supported, got {kind!r}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise Malformed(f"body.messages[{index}].content: a text part's text must be a string")
        texts.append(text)
    return "".join(texts)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _prompt(value: Any) -> Any:
    """A completions prompt: a string or token ids, or a list holding exactly one of
    them (several prompts are the HTTP endpoint's to split); shapes left to validation."""
    if _token_ids(value):
        return value
    if isinstance(value, list):
        if len(value) == 1 and (isinstance(value[0], str) or _token_ids(value[0])):
            return value[0]
        if len(value) > 1 and all(isinstance(p, str | list) for p in value):
            raise Malformed(
                "body.prompt: one prompt per line is supported in a batch file (a list of "
                "prompts over HTTP)"
            )
        raise Malformed("body.prompt: must be a string, token ids (integers), or a list of either")
    if value is None:
        raise Malformed("body.prompt is missing")
    return value


# --- results to answers ---------------------------------------------------------


class ResultLike(Protocol):
    """What an answer is made from: an ``exgen.client.Result``, or a stand-in."""

    id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def error(self) -> Any: ...


# A failed item as an HTTP answer has it: (status, error type). The codes not here
# (cancelled, timeout) are not answers of the API but of a batch run, and go in a batch
# line's "error" with "response": null, as OpenAI's batch does.
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


def error_response(
    url: str | None, code: str, message: str, field: str | None = None
) -> tuple[int, dict[str, Any]] | None:
    """(HTTP status, ``{"error": ...}`` body) of an item that failed with ``code``, as
    OpenAI's API answers it; ``field``: the item's field the error names, if any. None
    for an outcome that is no answer of the API (cancelled, timed out)."""
    http = OPENAI_HTTP_ERRORS.get(code)
    if http is None:
        return None
    status, kind = http
    param = field.removeprefix("params.") if field else None
    if code == P.E_MODEL_NOT_FOUND:
        param = "model"
    elif code == P.E_PROMPT_TOO_LONG:
        param = prompt_field(url)
    openai_code = OPENAI_ERROR_CODES.get(code, code)
    error = {"message": message, "type": kind, "param": param, "code": openai_code}
    return status, {"error": error}


def _samples(result: ResultLike) -> list[tuple[str, Any, Any]]:
    """(text, finish_reason, logprobs) of each of the result's n samples."""
    choices = getattr(result, "choices", None)
    if choices:
        return [(c.text, c.finish_reason, c.logprobs) for c in choices]
    return [(result.text, result.finish_reason, getattr(result, "logprobs", None))]


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


def _choice(
    url: str, item: Mapping[str, Any], index: int, sample: tuple[str, Any, Any], prompt: Any
) -> dict[str, Any]:
    text, finish_reason, logprobs = sample
    params = item["params"]
    if logprobs is None and (params.get("logprobs") or params.get("top_logprobs")):
        logprobs = []  # asked, and no token generated (max_tokens 0)
    choice: dict[str, Any] = {"index": index}
    if url == CHAT_URL:
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = None if logprobs is None else _chat_logprobs(logprobs)
    else:
        top = bool(params.get("top_logprobs"))
        echoed = prompt if params.get("echo") else None
        choice["text"] = text if echoed is None else _prompt_text(item, echoed) + text
        if logprobs is not None:
            prompt_entries = getattr(echoed, "logprobs", None) or []
            choice["logprobs"] = _completion_logprobs(logprobs, top, prompt_entries)
        else:
            choice["logprobs"] = None
        if getattr(prompt, "logprobs", None) is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(prompt.logprobs)
    choice["finish_reason"] = finish_reason
    return choice


def _prompt_text(item: Mapping[str, Any], prompt: Any) -> str:
    """The echoed prompt: as the request wrote it, or its token ids' text."""
    written = item.get("prompt")
    return written if isinstance(written, str) else str(prompt.text)


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


def usage(result: ResultLike) -> dict[str, Any]:
    """An answer's token counts, as OpenAI's ``usage`` has them; with the prompt tokens
    the engine's prefix cache served where the result says (``cached_tokens``)."""
    counts: dict[str, Any] = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
    cached = getattr(result, "cached_tokens", None)
    if cached is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": cached}
    return counts


def summed_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """Several answers' ``usage`` as one (a completions request of several prompts)."""
    counts: dict[str, Any] = {
        name: sum(u[name] for u in usages)
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    details = [u["prompt_tokens_details"] for u in usages if "prompt_tokens_details" in u]
    if details:
        cached = sum(d["cached_tokens"] for d in details)
        counts["prompt_tokens_details"] = {"cached_tokens": cached}
    return counts


def response_body(
    url: str,
    item: Mapping[str, Any],
    result: ResultLike,
    *,
    default_model: str = DEFAULT_MODEL_NAME,
    created: float | None = None,
) -> dict[str, Any]:
    """The ``chat.completion`` / ``text_completion`` object answering ``item`` (as
    :func:`item_from_body` made it) at ``url`` with its successful ``result``. It names
    the model that wrote the text: the result's (the daemon's served model), else
    ``default_model``; ``created``: the time it carries (default: now)."""
    chat = url == CHAT_URL
    prompt = getattr(result, "prompt", None)
    choices = [_choice(url, item, i, s, prompt) for i, s in enumerate(_samples(result))]
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time() if created is None else created),
        "model": getattr(result, "model", None) or default_model,
        "choices": choices,
        "usage": usage(result),
    }
    entries = getattr(prompt, "logprobs", None)
    if chat and entries is not None:  # vLLM's place for a chat's (completions: a choice's)
        body["prompt_logprobs"] = vllm_prompt_logprobs(entries)
    return body
