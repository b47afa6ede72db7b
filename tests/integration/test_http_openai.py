"""The official openai SDK against a real `exgen serve --http` (synthetic engine):
completions, chat (whole and streamed, sync and async), models, and the errors a
caller sees. Responses are the SDK's own pydantic types, so parsing them validates
the shapes; the tests also re-validate the raw JSON against those types."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.integration.http_support import HttpDaemon, request

CHAT = [{"role": "user", "content": "Tell me about rivers"}]


def test_chat_completion_validates_as_the_sdks_type(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="meta-llama/Meta-Llama-3-8B-Instruct", messages=CHAT, max_tokens=6, seed=1
    )
    assert isinstance(reply, ChatCompletion)
    assert reply.model == "synthetic"  # the served model's name, not the request's
    assert reply.choices[0].message.role == "assistant"
    assert len(reply.choices[0].message.content.split()) == 6
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 6
    raw = sdk.chat.completions.with_raw_response.create(model="x", messages=CHAT, max_tokens=3)
    ChatCompletion.model_validate(json.loads(raw.text), strict=False)


def test_completion_is_deterministic_greedy_text(sdk: openai.OpenAI) -> None:
    first = sdk.completions.create(model="x", prompt="Once upon a time", max_tokens=5)
    again = sdk.completions.create(model="x", prompt="Once upon a time", max_tokens=5)
    assert isinstance(first, Completion)
    assert first.object == "text_completion"
    assert first.choices[0].text == again.choices[0].text != ""
    assert first.id != again.id


def test_chat_stream_chunks_and_usage(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model="x", messages=CHAT, max_tokens=12)
    chunks = list(
        sdk.chat.completions.create(
            model="x",
            messages=CHAT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_without_usage(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.completions.create(model="x", prompt="abc", max_tokens=4, stream=True))
    assert all(c.object == "text_completion" and c.usage is None for c in chunks)
    whole = sdk.completions.create(model="x", prompt="abc", max_tokens=4)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_async_client_runs_requests_concurrently(gateway: HttpDaemon) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
        calls = [
            client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
            )
            for i in range(16)
        ]
        replies = await asyncio.gather(*calls)
        stream = await client.completions.create(model="x", prompt="a", max_tokens=3, stream=True)
        parts = [chunk.choices[0].text async for chunk in stream]
        await client.close()
        return [r.choices[0].message.content or "" for r in replies] + ["".join(parts)]

    texts = asyncio.run(main())
    assert len(texts) == 17 and all(texts)
    assert len(set(texts[:16])) > 1  # each prompt its own answer


def test_models_list_names_the_served_model(sdk: openai.OpenAI, gateway: HttpDaemon) -> None:
    models = sdk.models.list().data
    assert [m.id for m in models] == ["synthetic"]
    assert isinstance(models[0], Model)
    assert sdk.models.retrieve("synthetic").id == "synthetic"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")
    assert gateway.get("/health") == (200, {"status": "ok", "model": "synthetic"})


def test_unsupported_and_bad_fields_are_400s_naming_the_field(sdk: openai.OpenAI) -> None:
    cases = [
        ({"n": 17}, "n"),
        ({"n": 2, "stream": True}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(model="x", messages=CHAT, max_tokens=3, **extra)
        assert caught.value.status_code == 400
        assert caught.value.param == param, (extra, caught.value.body)
        assert param in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="x", messages=CHAT, extra_body={"temprature": 0.5})
    assert caught.value.param == "temprature" and "temperature" in caught.value.message


def test_n_samples_logprobs_and_a_json_schema_over_http(sdk: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["pos", "neg"]}, "score": {"type": "integer"}},
        "required": ["label", "score"],
    }
    reply = sdk.chat.completions.create(
        model="x",
        messages=CHAT,
        max_tokens=40,
        n=3,
        temperature=0.8,
        seed=3,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert isinstance(reply, ChatCompletion)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        data = json.loads(choice.message.content or "")
        assert data["label"] in ("pos", "neg") and isinstance(data["score"], int)
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_errors_are_openai_error_objects(gateway: HttpDaemon) -> None:
    status, body = request(gateway.url + "/v1/chat/completions", {"model": "x"})
    assert status == 400 and body["error"]["param"] == "messages"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = request(gateway.url + "/v1/nothing-here")
    assert status == 404 and body["error"]["message"]
    status, body = gateway.get("/v1/batches/batch_missing")
    assert status == 404 and "batch_missing" in body["error"]["message"]


def test_metrics_count_requests_by_route(gateway: HttpDaemon, sdk: openai.OpenAI) -> None:
    sdk.completions.create(model="x", prompt="count me", max_tokens=2)
    status, text = gateway.get("/metrics")
    assert status == 200
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("exgen_http_requests_total")
        and '"/v1/completions"' in ln
        and 'status="200"' in ln
    )
    assert float(line.split()[-1]) >= 1
    assert "exgen_http_daemon_workers_ready 2.0" in text


def test_a_caller_that_disconnects_frees_its_worker(http_daemon: Any) -> None:
    """One slot of capacity 1; a 1000-token stream (20 s) abandoned after its first
    chunk must not hold the slot: the next request is answered at once."""
    daemon = http_daemon(
        "--engine",
        "synthetic",
        "--engine-opt",
        "token_ms=20",
        "--engine-opt",
        "capacity=1",
    )
    daemon.wait_healthy()
    port = int(daemon.url.rsplit(":", 1)[1])
    for stream in (True, False):
        body = json.dumps(
            {"model": "x", "prompt": "long", "max_tokens": 1000, "stream": stream}
        ).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if stream:
            assert b"200 OK" in sock.recv(4096)  # the stream has begun
        else:
            time.sleep(0.5)  # it runs
        sock.close()
        started = time.monotonic()
        sdk = openai.OpenAI(base_url=daemon.base_url, api_key="x", max_retries=0)
        sdk.completions.create(model="x", prompt="short", max_tokens=2, timeout=15)
        assert time.monotonic() - started < 5, f"the abandoned request held the slot ({stream=})"
    assert daemon.stop() == 0
