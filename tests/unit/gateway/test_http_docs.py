"""docs/http.md says what a request may hold: each field its table says is mapped is
accepted by the gateway, and each it says is refused is refused naming it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from exgen.daemon.gateway.completions import parse_body
from exgen.daemon.gateway.errors import ApiError

DOC = Path(__file__).parents[3] / "docs" / "http.md"
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"

# A value that uses each field the docs name (not its neutral value, where it has one).
ACCEPTED: dict[str, Any] = {
    "prompt": ["one", "two"],
    "echo": True,
    "prompt_logprobs": 2,
    "max_tokens": 5,
    "max_completion_tokens": 5,
    "temperature": 0.7,
    "top_p": 0.9,
    "seed": 3,
    "stop": ["\n"],
    "n": 3,
    "logprobs": True,
    "top_logprobs": 2,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "response_format": {"type": "json_object"},
    "top_k": 40,
    "min_p": 0.1,
    "repetition_penalty": 1.1,
    "stream": True,
    "model": "any",
    "user": "u",
    "metadata": {"a": "b"},
    "store": False,
    "service_tier": "auto",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "ignore_eos": True,
    "min_tokens": 2,
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
}
REFUSED: dict[str, Any] = {
    "best_of": 2,
    "logit_bias": {"50256": -100},
    "suffix": "end",
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "functions": [{"name": "f"}],
    "function_call": "auto",
}
STREAM_ONLY = frozenset({"stream", "stream_options"})  # not with n or logprobs


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def documented() -> tuple[set[str], set[str]]:
    """(the fields the table maps, the fields the paragraph after it refuses)."""
    text = section("What a request may hold")
    table = [ln for ln in text.splitlines() if ln.startswith("| `")]
    accepted = {
        name.split(".")[0].split("[")[0]
        for row in table
        for name in re.findall(r"`([a-z_][a-z_.\[\]]*)`", row.split("|")[1])
    }
    refused_text = text[text.index("Refused with a 400") :]
    refused_text = refused_text[: refused_text.index("(other than")]
    return accepted, set(re.findall(r"`([a-z_]+)`", refused_text))


def body(url: str, **fields: Any) -> bytes:
    text = (
        {"prompt": "hi"}
        if url == COMPLETIONS_URL
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    return json.dumps({"model": "x", **text, **fields}).encode()


def test_every_field_the_docs_map_is_accepted() -> None:
    accepted, _ = documented()
    assert accepted - ACCEPTED.keys() == set(), "a documented field this test cannot try"
    for name in sorted(accepted):
        fields = {name: ACCEPTED[name]}
        if name in STREAM_ONLY:
            fields["stream"] = True
        url = COMPLETIONS_URL if name in ("prompt", "echo") else CHAT_URL
        parse_body(body(url, **fields), url)  # raises ApiError if refused


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_every_field_the_docs_refuse_is_refused_naming_it(name: str) -> None:
    _, refused = documented()
    assert refused == REFUSED.keys()
    url = COMPLETIONS_URL if name in ("echo", "suffix", "best_of") else CHAT_URL
    with pytest.raises(ApiError) as caught:
        parse_body(body(url, **{name: REFUSED[name]}), url)
    assert (caught.value.status, caught.value.param) == (400, name)


def test_null_is_not_given() -> None:
    """As OpenAI's API and vLLM take it: clients send null for fields they leave unset."""
    fields = dict.fromkeys(("max_tokens", "n", "temperature", "top_logprobs", "min_tokens"))
    parsed = parse_body(body(CHAT_URL, **fields), CHAT_URL)
    assert parsed.item["params"] == {}


def test_add_special_tokens_on_chat_is_only_false() -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(body(CHAT_URL, add_special_tokens=True), CHAT_URL)
    assert caught.value.param == "add_special_tokens"
    assert parse_body(body(CHAT_URL, add_special_tokens=False), CHAT_URL).item["params"] == {}
    completion = parse_body(body(COMPLETIONS_URL, add_special_tokens=False), COMPLETIONS_URL)
    assert completion.item["params"] == {"add_special_tokens": False}
