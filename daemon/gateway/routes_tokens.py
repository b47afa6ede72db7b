"""vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``: the engine's own
tokenizer, for clients that count or build prompts in tokens (lm-eval without a local
tokenizer, load generators). The gateway has no tokenizer: each call is a job of
max_new_tokens 0 that only reads its prompt (``echo``), run where the model is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from exgen.client import errors
from exgen.client import openai_body as O
from exgen.client import protocol as P
from exgen.client.client import Result
from exgen.daemon.gateway.completions import json_object
from exgen.daemon.gateway.errors import ApiError, from_exgen_error, from_request_failed
from exgen.daemon.gateway.routes_openai import read_body

if TYPE_CHECKING:
    from exgen.daemon.gateway.state import Gateway

router = APIRouter()
TOKENIZE_KEYS = frozenset(
    (
        "model",
        "prompt",
        "messages",
        "add_special_tokens",
        "add_generation_prompt",
        "return_token_strs",
    )
)


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    gateway: Gateway = request.app.state.gateway
    body = json_object(await read_body(request, gateway.options.max_body_bytes))
    item = tokenize_item(body)
    result = await _read_prompt(gateway, item)
    assert result.prompt is not None
    ids = result.prompt.ids
    return {
        "count": len(ids),
        "max_model_len": max_model_len(gateway.upstream.status),
        "tokens": ids,
        "token_strs": None,
    }


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    gateway: Gateway = request.app.state.gateway
    body = json_object(await read_body(request, gateway.options.max_body_bytes))
    _only(body, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise ApiError(400, "tokens must be a list of token ids", param="tokens")
    # skip_special_tokens false: as vLLM decodes, every token shown
    params = {"max_new_tokens": 0, "echo": True, "skip_special_tokens": False}
    item = {"prompt": tokens, "params": params}
    _check(item, "tokens")
    result = await _read_prompt(gateway, item)
    assert result.prompt is not None
    return {"prompt": result.prompt.text}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    gateway: Gateway = request.app.state.gateway
    for worker in gateway.upstream.status.get("workers") or ():
        info = worker.get("tokenizer")
        if isinstance(info, dict):
            return info
    if not gateway.upstream.ready:
        raise ApiError(503, gateway.upstream.why_not_ready(), retry_after_s=1)
    raise ApiError(404, "This engine does not describe its tokenizer", code="not_found")


def tokenize_item(body: dict[str, Any]) -> dict[str, Any]:
    """The job for a /tokenize body: a prompt (its BOS as add_special_tokens says) or
    chat messages (rendered with the generation prompt, as a chat request is)."""
    _only(body, TOKENIZE_KEYS)
    _only_value(body, "return_token_strs", False, "token strings are not returned")
    _only_value(body, "add_generation_prompt", True, "chat prompts end ready for the answer")
    params: dict[str, Any] = {"max_new_tokens": 0, "echo": True}
    if body.get("add_special_tokens") is not None:
        params["add_special_tokens"] = body["add_special_tokens"]
    item: dict[str, Any] = {"params": params}
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "give prompt or messages (one of them)", param="prompt")
    if "prompt" in body:
        item["prompt"] = body["prompt"]
    else:
        item["messages"] = _messages(body["messages"])
    _check(item, "messages" if "messages" in body else "prompt")
    return item


def _only_value(body: dict[str, Any], name: str, allowed: bool, why: str) -> None:
    value = body.get(name)
    if value is not None and value is not allowed:
        raise ApiError(400, f"{name}: only {str(allowed).lower()} is supported ({why})", param=name)


def _messages(value: Any) -> Any:
    try:
        item = O.item_from_body({"messages": value}, O.CHAT_URL, "t")
    except O.Malformed as exc:
        raise ApiError(400, str(exc).replace("body.", ""), param="messages") from None
    return item["messages"]


def _only(body: dict[str, Any], known: frozenset[str] | set[str]) -> None:
    for key in body:
        if key not in known:
            names = ", ".join(sorted(known))
            raise ApiError(400, f"unknown field {key!r} (known: {names})", param=key)


def _check(item: dict[str, Any], field: str) -> None:
    """The protocol's own checks, here, so a bad field is a 400 naming it."""
    try:
        P.validate_item({"id": "t", **item}, "item")
    except P.ValidationError as exc:
        path = exc.field.removeprefix("item.").removeprefix("params.")
        name = path.split("[")[0].split(".")[0]
        name = field if name in ("prompt", "messages") else name
        raise ApiError(400, f"{name}: {exc.message}", param=name) from None


async def _read_prompt(gateway: Gateway, item: dict[str, Any]) -> Result:
    if not gateway.upstream.ready:
        raise ApiError(503, gateway.upstream.why_not_ready(), retry_after_s=1)
    item = {"id": "tokens", **item, "timeout_s": gateway.options.request_timeout_s}
    gateway.admit()
    try:
        [result] = await gateway.upstream.client.generate([item])
    except errors.ExgenError as exc:
        raise from_exgen_error(exc) from None
    finally:
        gateway.discharge()
    if result.error is not None:
        raise from_request_failed(result.error)
    if result.prompt is None:
        raise ApiError(500, "the engine did not return the prompt", code=P.E_ENGINE)
    return result


def max_model_len(status: dict[str, Any]) -> int | None:
    lengths = [w.get("max_seq_len") for w in status.get("workers") or ()]
    known = [n for n in lengths if isinstance(n, int)]
    return min(known) if known else None
