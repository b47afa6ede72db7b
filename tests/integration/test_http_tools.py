"""What the tools people point at exgen's HTTP API expect of it, with their default
settings: the openai SDK's auto-paging, concurrent streaming without stray tasks,
batch lines refused and failed in one shape, the vLLM extensions load generators
send. Each against a real `exgen serve --http` (synthetic engine)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.http_support import (
    SYNTHETIC,
    HttpDaemon,
    batch_lines,
    request,
    start_http_daemon,
)

CONTEXT = 256  # the synthetic engine's context: a longer prompt is refused
CHAT_URL = "/v1/chat/completions"
FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon whose file list is this module's alone."""
    daemon = start_http_daemon(
        tmp_path_factory.mktemp("tools"),
        *SYNTHETIC,
        "--engine-opt",
        f"max_seq_len={CONTEXT}",
        "--engine-opt",
        "eos_from_prompt=1",  # a prompt holding len=N ends with an EOS after N tokens
    )
    daemon.wait_healthy()
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture
def client(fresh: HttpDaemon) -> Any:
    with openai.OpenAI(base_url=fresh.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


def upload_files(sdk: openai.OpenAI, tmp_path: Path, count: int) -> list[str]:
    path = tmp_path / "input.jsonl"
    path.write_text(batch_lines(1))
    ids = []
    for _ in range(count):
        with path.open("rb") as f:
            ids.append(sdk.files.create(file=f, purpose="batch").id)
    return ids


def test_files_list_pages_through_every_file(
    fresh: HttpDaemon, tmp_path: Path, client: openai.OpenAI
) -> None:
    sdk = client
    ids = upload_files(sdk, tmp_path, 7)
    first = sdk.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
    assert [f.id for f in sdk.files.list(limit=2, purpose="batch")] == ids[::-1]
    assert [f.id for f in sdk.files.list(limit=3, order="asc")] == ids
    status, page = fresh.get(f"/v1/files?limit=2&after={ids[2]}&order=asc")
    assert status == 200
    assert [f["id"] for f in page["data"]] == ids[3:5]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[3], ids[4], True)
    status, page = fresh.get(f"/v1/files?limit=7&after={ids[6]}")
    assert [f["id"] for f in page["data"]] == ids[:6][::-1] and page["has_more"] is False
    status, page = fresh.get(f"/v1/files?after={ids[0]}")
    assert page == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=-3", "limit"),
        ("limit=10001", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("limit=two", "limit"),
        ("order=sideways", "order"),
        ("after=file-nosuchfile", "after"),
    ],
)
def test_files_list_refuses_a_bad_page_naming_it(fresh: HttpDaemon, query: str, param: str) -> None:
    status, body = fresh.get(f"/v1/files?{query}")
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["code"], body
    if param == "after":
        assert "no file with id 'file-nosuchfile'" in body["error"]["message"]


def test_batches_list_refuses_a_bad_page_naming_it(fresh: HttpDaemon) -> None:
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("after=batch_x", "after")):
        status, body = request(f"{fresh.url}/v1/batches?{query}")
        assert status == 400 and body["error"]["param"] == param, (query, body)


def test_concurrent_streams_leave_no_pending_task_behind(http_daemon: Any) -> None:
    """16 streamed chats, 8 at a time, every other one abandoned after a few chunks:
    each wait the gateway starts for them ends with them (a task left pending is
    reported when it is collected, at the latest as the gateway stops)."""
    daemon = http_daemon("--engine", "synthetic", "--engine-opt", "token_ms=5", "--workers", "2")
    daemon.wait_healthy()

    async def one(client: openai.AsyncOpenAI, gate: asyncio.Semaphore, i: int) -> str:
        async with gate:
            stream = await client.chat.completions.create(
                model="x",
                messages=[{"role": "user", "content": f"river {i}"}],
                max_tokens=20,
                stream=True,
            )
            text = ""
            async for chunk in stream:
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
                if i % 2 and len(text.split()) >= 3:
                    await stream.close()
                    break
            return text

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0)
        gate = asyncio.Semaphore(8)
        async with client:
            return await asyncio.gather(*(one(client, gate, i) for i in range(16)))

    texts = asyncio.run(main())
    assert [len(t.split()) for t in texts[::2]] == [20] * 8
    assert daemon.stop() == 0
    log = daemon.daemon.log_text()
    assert "Task was destroyed" not in log and "never awaited" not in log, log[-3000:]


def run_batch(sdk: openai.OpenAI, tmp_path: Path, lines: list[dict[str, Any]]) -> Any:
    path = tmp_path / "lines.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as f:
        file = sdk.files.create(file=f, purpose="batch")
    batch = sdk.batches.create(input_file_id=file.id, endpoint=CHAT_URL, completion_window="24h")
    deadline = time.monotonic() + 60
    while (batch := sdk.batches.retrieve(batch.id)).status not in FINAL:
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


def chat_line(custom_id: str, content: str = "hi", **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT_URL,
        "body": {"model": "x", "messages": messages, "max_tokens": 3, **body},
    }


def test_an_unknown_key_on_a_batch_line_fails_the_file_naming_it(
    fresh: HttpDaemon, tmp_path: Path, client: openai.OpenAI
) -> None:
    sdk = client
    batch = run_batch(sdk, tmp_path, [chat_line("a"), {**chat_line("b"), "metdata": {}}])
    assert batch.status == "failed" and batch.errors is not None
    [error] = batch.errors.data
    assert (error.line, error.param, error.code) == (2, "metdata", "invalid_request")
    assert "metdata" in (error.message or "")


def test_per_request_failures_share_one_shape_and_code(
    fresh: HttpDaemon, tmp_path: Path, client: openai.OpenAI
) -> None:
    """A too-long prompt and a bad body fail alone, each as the 400 the same request
    gets interactively: the same error object, the same codes, never a null one."""
    sdk = client
    long = "word " * (CONTEXT * 2)
    lines = [
        chat_line("ok"),
        chat_line("long", long),
        chat_line("typo", temprature=0.5),
        chat_line("best", best_of=3),
    ]
    batch = run_batch(sdk, tmp_path, lines)
    assert batch.status == "completed" and batch.request_counts.failed == 3
    failed = {
        r["custom_id"]: r
        for r in map(json.loads, sdk.files.content(batch.error_file_id).text.splitlines())
    }
    codes = {}
    for custom_id, record in failed.items():
        assert record["error"] is None and record["response"]["status_code"] == 400, record
        error = record["response"]["body"]["error"]
        assert {"message", "type", "param", "code"} <= error.keys(), record
        assert error["type"] == "invalid_request_error" and error["code"], record
        codes[custom_id] = (error["code"], error["param"])
    assert codes == {
        "long": ("context_length_exceeded", "messages"),
        "typo": ("bad_request", "temprature"),
        "best": ("bad_request", "best_of"),
    }
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="x", messages=[{"role": "user", "content": long}], max_tokens=3
        )
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")


# --- vLLM's extensions -------------------------------------------------------------------


def complete(sdk: openai.OpenAI, prompt: str, **extra: Any) -> Any:
    max_tokens = extra.pop("max_tokens", 8)
    reply = sdk.completions.create(
        model="x", prompt=prompt, max_tokens=max_tokens, extra_body=extra
    )
    return reply.choices[0], reply.usage


def test_ignore_eos_and_min_tokens_hold_the_eos_back(
    fresh: HttpDaemon, client: openai.OpenAI
) -> None:
    sdk = client
    choice, usage = complete(sdk, "len=3 rivers")
    assert (choice.finish_reason, usage.completion_tokens) == ("stop", 3)
    choice, usage = complete(sdk, "len=3 rivers", ignore_eos=True)
    assert (choice.finish_reason, usage.completion_tokens) == ("length", 8)
    choice, usage = complete(sdk, "len=3 rivers", min_tokens=5)
    assert (choice.finish_reason, usage.completion_tokens) == ("stop", 5)
    plain, _ = complete(sdk, "len=3 rivers", max_tokens=8, ignore_eos=True)
    assert plain.text.startswith(choice.text)


def test_stop_strings_with_include_stop_str_and_min_tokens(
    fresh: HttpDaemon, client: openai.OpenAI
) -> None:
    sdk = client
    whole, _ = complete(sdk, "the sea", max_tokens=12)
    words = whole.text.split(" ")  # synthetic words each begin with a space
    stop = " " + words[3]
    before = " ".join(words[:3])
    cut, _ = complete(sdk, "the sea", max_tokens=12, stop=[stop])
    assert (cut.text, cut.finish_reason) == (before, "stop")
    kept, _ = complete(sdk, "the sea", max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert (kept.text, kept.finish_reason) == (before + stop, "stop")
    late, _ = complete(sdk, "the sea", max_tokens=12, stop=[stop], min_tokens=6)
    assert late.text.startswith(before + stop) and len(late.text) > len(before + stop)
    same, _ = complete(sdk, "the sea", max_tokens=12, skip_special_tokens=False)
    assert same.text == whole.text  # the synthetic engine has no special tokens to show


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9}, "min_tokens"),  # more than max_tokens
        ({"skip_special_tokens": 1}, "skip_special_tokens"),
        ({"include_stop_str_in_output": "no"}, "include_stop_str_in_output"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": "y"}},
            "continuous_usage_stats",
        ),
        ({"stream": True, "stream_options": {"include_usgae": True}}, "include_usgae"),
    ],
)
def test_bad_extension_values_are_400s_naming_them(
    fresh: HttpDaemon, extra: dict[str, Any], param: str
) -> None:
    status, body = request(
        f"{fresh.url}/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 8, **extra}
    )
    assert status == 400 and body["error"]["param"] == param, body


def test_continuous_usage_stats_counts_tokens_on_every_chunk(
    fresh: HttpDaemon, client: openai.OpenAI
) -> None:
    sdk = client
    chunks = list(
        sdk.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "one two three"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        )
    )
    counted = [c.usage for c in chunks if c.choices]
    assert counted and all(u is not None for u in counted), chunks
    tokens = [u.completion_tokens for u in counted]
    assert tokens == sorted(tokens) and tokens[-1] == 6
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == 6
    assert {u.prompt_tokens for u in counted} == {final.usage.prompt_tokens}
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in counted)


# --- what evaluation harnesses send -------------------------------------------------------


def test_several_prompts_in_one_completions_request(
    fresh: HttpDaemon, client: openai.OpenAI
) -> None:
    """lm-eval's batch_size > 1 (with tokenized_requests off): a list of prompts, one
    answer each, n samples each, in prompt order, as OpenAI and vLLM number them."""
    sdk = client
    prompts = ["rivers run", "mountains stand", "the sea"]
    reply = sdk.completions.create(
        model="x", prompt=prompts, max_tokens=4, n=2, seed=5, temperature=0.9
    )
    assert [c.index for c in reply.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        alone = sdk.completions.create(
            model="x", prompt=prompt, max_tokens=4, n=2, seed=5, temperature=0.9
        )
        assert [c.text for c in reply.choices[2 * i : 2 * i + 2]] == [c.text for c in alone.choices]
    assert reply.usage is not None and reply.usage.completion_tokens == 6 * 4
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="x", prompt=["a", "b"], max_tokens=4, stream=True)
    assert caught.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="x", prompt=["a"] * 257, max_tokens=4)
    assert caught.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:  # one of them too long: the request
        sdk.completions.create(model="x", prompt=["a", "word " * (CONTEXT * 2)], max_tokens=4)
    assert caught.value.code == "context_length_exceeded"


def test_token_id_prompts(fresh: HttpDaemon, client: openai.OpenAI) -> None:
    """lm-eval's tokenized_requests (its default): prompts as token ids, one or a batch."""
    sdk = client
    one = sdk.completions.create(model="x", prompt=[3, 7, 11], max_tokens=4)
    assert one.usage is not None and one.usage.prompt_tokens == 3
    batch = sdk.completions.create(model="x", prompt=[[3, 7, 11], [5, 5]], max_tokens=4)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == one.choices[0].text != batch.choices[1].text
    assert batch.usage is not None and batch.usage.prompt_tokens == 5
    for bad in ([3, -1], [3, 1.5], [[3], "x", []], [[0] * 10, [True]]):
        status, body = request(f"{fresh.url}/v1/completions", {"prompt": bad, "max_tokens": 2})
        assert status == 400 and body["error"]["param"] == "prompt", (bad, body)


def test_the_loglikelihood_request(fresh: HttpDaemon, client: openai.OpenAI) -> None:
    """lm-eval's loglikelihood: echo, logprobs over the prompt's tokens, max_tokens 0 or 1."""
    sdk = client
    prompt = "the quick brown fox"
    zero = sdk.completions.create(model="x", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    [choice] = zero.choices
    assert choice.text == prompt and zero.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and lp.tokens == ["the", "quick", "brown", "fox"]
    assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
    one = sdk.completions.create(model="x", prompt=prompt, max_tokens=1, echo=True, logprobs=1)
    assert one.choices[0].text.startswith(prompt) and len(one.choices[0].logprobs.tokens) == 5
    assert one.choices[0].logprobs.token_logprobs[:4] == lp.token_logprobs
    ids = sdk.completions.create(
        model="x", prompt=[[3, 7], [5]], max_tokens=0, echo=True, logprobs=0
    )
    assert [len(c.logprobs.tokens) for c in ids.choices] == [2, 1]
    raw = request(
        f"{fresh.url}/v1/completions",
        {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2},
    )[1]
    positions = raw["choices"][0]["prompt_logprobs"]
    assert positions[0] is None and len(positions) == 4
    assert all(len(p) == 2 and all(v["rank"] >= 1 for v in p.values()) for p in positions[1:])
    status, body = request(
        f"{fresh.url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "echo": True},
    )
    assert status == 400 and body["error"]["param"] == "echo"
    for extra in ({"echo": True}, {"prompt_logprobs": 0}):
        status, body = request(
            f"{fresh.url}/v1/completions", {"prompt": "x", "stream": True, **extra}
        )
        assert status == 400 and body["error"]["param"] in extra, body


def test_tokenize_detokenize_and_tokenizer_info(fresh: HttpDaemon) -> None:
    """vLLM's tokenizer routes, answered by the engine's own tokenizer (here one
    synthetic word a token)."""
    status, tokens = request(f"{fresh.url}/tokenize", {"prompt": "the quick brown fox"})
    assert status == 200, tokens
    assert tokens["count"] == 4 and len(tokens["tokens"]) == 4
    assert tokens["max_model_len"] == CONTEXT and tokens["token_strs"] is None
    status, text = request(f"{fresh.url}/detokenize", {"tokens": tokens["tokens"]})
    assert (status, text) == (200, {"prompt": "the quick brown fox"})
    messages = [{"role": "user", "content": "one two"}]
    status, chat = request(f"{fresh.url}/tokenize", {"messages": messages})
    assert status == 200 and chat["count"] == 3  # "user:" "one" "two"
    status, info = request(f"{fresh.url}/tokenizer_info")
    assert status == 200 and info["tokenizer_class"] == "SyntheticWords"
    for path, body, param in (
        ("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
        ("/tokenize", {"text": "x"}, "text"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens"),
        ("/detokenize", {"tokens": [1, -2]}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ):
        status, error = request(f"{fresh.url}{path}", body)
        assert status == 400 and error["error"]["param"] == param, (path, body, error)
