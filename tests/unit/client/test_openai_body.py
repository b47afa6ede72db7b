"""exgen.client.openai_body: OpenAI bodies to items and results to answers, dicts in and
dicts out, and the same mapping a batch file's OpenAI line gets."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest

from exgen.client import batchfile as B
from exgen.client import errors
from exgen.client import openai_body as O
from exgen.client import protocol as P

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}


@dataclass
class FakePrompt:
    ids: list[int]
    text: str
    logprobs: list[list[Any]] | None = None


@dataclass
class FakeResult:
    id: str
    text: str = "hello"
    finish_reason: str | None = "stop"
    prompt_tokens: int = 5
    completion_tokens: int = 3
    error: errors.RequestFailed | None = None
    model: str | None = None
    prompt: FakePrompt | None = None  # what the daemon sends back where echo asked


def test_a_chat_body_is_an_item() -> None:
    item = O.item_from_body(CHAT, O.CHAT_URL, "r1")
    assert item == {
        "id": "r1",
        "params": {"max_new_tokens": 7},
        "messages": [{"role": "user", "content": "hi"}],
        "model": "m",
    }


def test_a_body_is_left_as_it_was() -> None:
    body = {**CHAT, "temperature": None, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}  # fmt: skip
    before = copy.deepcopy(body)
    item = O.item_from_body(body, O.CHAT_URL, "r1")
    assert body == before
    assert item["messages"] == [{"role": "user", "content": "ab"}]


@pytest.mark.parametrize(
    ("body", "url"),
    [
        (CHAT, O.CHAT_URL),
        ({"prompt": "x", "logprobs": 2, "echo": True}, O.COMPLETIONS_URL),
        ({"prompt": [1, 2, 3], "seed": 1, "stop": ["a"]}, O.COMPLETIONS_URL),
        ({"messages": [{"role": "user", "content": "x"}], "temprature": 1}, O.CHAT_URL),
        ({"messages": "x"}, O.CHAT_URL),
        ({"prompt": ["a", "b"]}, O.COMPLETIONS_URL),
    ],
)
def test_the_same_mapping_as_a_batch_line(body: dict[str, Any], url: str) -> None:
    """What a body maps to (or the message refusing it) is what its batch line gets."""
    entry = B.parse_line(json.dumps({"custom_id": "r1", "url": url, "body": body}), 1)
    try:
        item = O.item_from_body(body, url, "r1")
    except O.Malformed as exc:
        assert isinstance(entry, B.LineError) and entry.message == str(exc)
    else:
        assert isinstance(entry, B.BatchLine) and entry.to_item() == item


def test_a_lone_surrogate_is_refused_naming_its_field() -> None:
    raw = '{"messages": [{"role": "user", "content": "a\\ud800"}]}'
    body = json.loads(raw)
    for given in (raw, None):  # the JSON text, or none at hand: the body is searched
        with pytest.raises(O.Malformed, match=r"body\.messages\[0\]\.content: holds a lone"):
            O.item_from_body(body, O.CHAT_URL, "r1", raw=given)


def test_a_response_body_names_the_served_model() -> None:
    item = O.item_from_body(CHAT, O.CHAT_URL, "r1")
    body = O.response_body(O.CHAT_URL, item, FakeResult("r1"), default_model="served", created=7)
    assert body["object"] == "chat.completion" and body["created"] == 7
    assert body["model"] == "served"  # not the "m" the request named
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    answered = FakeResult("r1", model="the-daemons")
    assert O.response_body(O.CHAT_URL, item, answered)["model"] == "the-daemons"


def test_a_response_body_says_how_many_prompt_tokens_a_prefix_cache_served() -> None:
    item = O.item_from_body(CHAT, O.CHAT_URL, "r1")
    result = FakeResult("r1")
    result.cached_tokens = 96  # type: ignore[attr-defined]
    body = O.response_body(O.CHAT_URL, item, result, default_model="served", created=7)
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}


def test_an_echoed_completion_repeats_the_prompt() -> None:
    item = O.item_from_body({"prompt": "say ", "echo": True}, O.COMPLETIONS_URL, "r1")
    result = FakeResult("r1", prompt=FakePrompt([1, 2], "say "))
    body = O.response_body(O.COMPLETIONS_URL, item, result)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "say hello"


@pytest.mark.parametrize(
    ("code", "url", "status", "param", "openai_code"),
    [
        (P.E_PROMPT_TOO_LONG, O.CHAT_URL, 400, "messages", "context_length_exceeded"),
        (P.E_PROMPT_TOO_LONG, O.COMPLETIONS_URL, 400, "prompt", "context_length_exceeded"),
        (P.E_MODEL_NOT_FOUND, O.CHAT_URL, 404, "model", P.E_MODEL_NOT_FOUND),
        (P.E_ENGINE, O.CHAT_URL, 500, None, P.E_ENGINE),
    ],
)
def test_error_responses(
    code: str, url: str, status: int, param: str | None, openai_code: str
) -> None:
    answer = O.error_response(url, code, "why")
    assert answer is not None
    assert answer[0] == status
    assert answer[1] == {
        "error": {"message": "why", "type": answer[1]["error"]["type"], "param": param,
                  "code": openai_code}}  # fmt: skip


def test_a_run_outcome_is_no_api_answer() -> None:
    assert O.error_response(O.CHAT_URL, P.E_CANCELLED, "cancelled") is None
