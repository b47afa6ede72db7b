"""Batch-file parsing, output shapes and resume: exgen.client.batchfile, no sockets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exgen.client import batchfile as B
from exgen.client import errors


def parse_all(*lines: Any) -> list[B.Entry]:
    raw = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return list(B.read_batch(raw))


def one(line: Any) -> B.BatchLine:
    [entry] = parse_all(line)
    assert isinstance(entry, B.BatchLine), entry
    return entry


def error_of(line: Any) -> B.LineError:
    [entry] = parse_all(line)
    assert isinstance(entry, B.LineError), entry
    return entry


@dataclass
class FakeResult:
    id: str
    text: str = "hello"
    finish_reason: str | None = "stop"
    prompt_tokens: int = 5
    completion_tokens: int = 3
    error: errors.RequestFailed | None = None
    model: str | None = None


# --- plain and chat lines --------------------------------------------------------


def test_plain_line_with_params() -> None:
    line = one({"id": "a", "prompt": "hi", "max_new_tokens": 7, "temperature": 0.5, "seed": 3})
    assert line.id == "a" and line.prompt == "hi" and line.messages is None
    assert line.params == {"max_new_tokens": 7, "temperature": 0.5, "seed": 3}
    assert not line.is_openai
    assert line.to_item() == {"id": "a", "prompt": "hi", "params": line.params}


def test_every_param_name_is_accepted_at_top_level() -> None:
    line = one(
        {
            "prompt": "x",
            "max_new_tokens": 1,
            "temperature": 1.0,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "seed": 0,
            "stop": ["\n"],
        }
    )
    assert set(line.params) == {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop",
    }


def test_max_tokens_is_an_alias() -> None:
    assert one({"prompt": "x", "max_tokens": 9}).params == {"max_new_tokens": 9}


def test_alias_and_canonical_together_is_an_error() -> None:
    err = error_of({"prompt": "x", "max_tokens": 9, "max_new_tokens": 9})
    assert "max_new_tokens" in err.message and "max_tokens" in err.message


def test_nested_params_map_is_accepted() -> None:
    line = one({"prompt": "x", "params": {"temperature": 0.7, "max_tokens": 4}})
    assert line.params == {"temperature": 0.7, "max_new_tokens": 4}


def test_param_both_nested_and_top_level_is_an_error() -> None:
    err = error_of({"prompt": "x", "temperature": 0.1, "params": {"temperature": 0.2}})
    assert "temperature" in err.message and "params.temperature" in err.message


def test_stop_string_becomes_list() -> None:
    assert one({"prompt": "x", "stop": "END"}).params == {"stop": ["END"]}


def test_chat_line() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    line = one({"id": "c1", "messages": msgs, "top_k": 5})
    assert line.messages == msgs and line.prompt is None
    assert line.to_item() == {"id": "c1", "messages": msgs, "params": {"top_k": 5}}


def test_missing_id_is_the_line_number() -> None:
    entries = parse_all({"prompt": "a"}, "", "   ", {"prompt": "b"})
    assert [e.id for e in entries] == ["line-1", "line-4"]
    assert [e.line_no for e in entries] == [1, 4]


def test_blank_lines_are_skipped_but_counted() -> None:
    entries = parse_all("", {"prompt": "a"}, "\n", "not json")
    assert len(entries) == 2
    assert isinstance(entries[1], B.LineError) and entries[1].line_no == 4


def test_unknown_key_is_named_with_a_suggestion() -> None:
    err = error_of({"prompt": "x", "temprature": 0.5})
    assert "'temprature'" in err.message and "did you mean 'temperature'" in err.message


def test_unknown_key_in_nested_params() -> None:
    err = error_of({"prompt": "x", "params": {"top_pp": 0.5}})
    assert "params.'top_pp'" in err.message or "'top_pp'" in err.message


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature: must be a number"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_new_tokens": 1.5}, "max_new_tokens: must be an integer"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "stop": [""]}, "stop[0]"),
        ({"prompt": "x", "params": {"seed": -4}}, "params.seed"),
        ({"prompt": 5}, "prompt: must be a string"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({"id": "a"}, "exactly one"),
        ({"id": 5, "prompt": "x"}, "id must be a non-empty string"),
        ({"id": "", "prompt": "x"}, "id must be a non-empty string"),
        ({"id": "x" * 300, "prompt": "x"}, "longer than"),
        ({"prompt": "x", "params": [1]}, "params must be an object"),
    ],
)
def test_bad_lines_say_why(line: dict[str, Any], needle: str) -> None:
    err = error_of(line)
    assert needle in err.message
    assert err.line_no == 1
    assert str(err).startswith("line 1: ")


def test_bad_line_keeps_its_own_id_when_usable() -> None:
    assert error_of({"id": "mine", "prompt": "x", "temperature": -1}).id == "mine"
    assert error_of({"id": 7, "prompt": "x"}).id == "line-1"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "x"', "not valid JSON"),
        ("[1, 2]", "got an array"),
        ('"just a string"', "got a string"),
        ("42", "got a number"),
        ("null", "got null"),
        (b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
    ],
)
def test_unparseable_lines(raw: str | bytes, needle: str) -> None:
    [entry] = list(B.read_batch([raw]))
    assert isinstance(entry, B.LineError)
    assert needle in entry.message and entry.id == "line-1"


def test_duplicate_id_rejects_the_later_line() -> None:
    entries = parse_all(
        {"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"}, {"id": "a", "prompt": "3"}
    )
    assert [type(e).__name__ for e in entries] == ["BatchLine", "BatchLine", "LineError"]
    dup = entries[2]
    assert isinstance(dup, B.LineError)
    assert dup.line_no == 3 and "duplicate id 'a'" in dup.message
    assert dup.id == "a", "the record keeps the line's own id (a line-N could be a real id)"
    assert B.format_line_error(dup)["error"]["line"] == 3  # and names the line


def test_explicit_id_colliding_with_a_fallback_id_is_a_duplicate() -> None:
    entries = parse_all({"prompt": "1"}, {"id": "line-1", "prompt": "2"})
    assert isinstance(entries[1], B.LineError)


def test_reading_is_lazy() -> None:
    def lines() -> Any:
        yield json.dumps({"prompt": "first"})
        raise AssertionError("read past what was asked for")

    first = next(iter(B.read_batch(lines())))
    assert isinstance(first, B.BatchLine)


def test_open_batch_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "bom"}\r\n\n{"prompt": "caf\xc3\xa9"}')
    entries = list(B.open_batch(path))
    assert [e.prompt for e in entries if isinstance(e, B.BatchLine)] == ["bom", "café"]
    assert B.count_lines(path) == 2


def test_examples_file_is_the_seed_workload() -> None:
    path = Path(__file__).parents[3] / "examples" / "prompts.jsonl"
    entries = list(B.open_batch(path))
    assert len(entries) == 100
    assert all(isinstance(e, B.BatchLine) for e in entries)
    good = [e for e in entries if isinstance(e, B.BatchLine)]
    assert len({e.prompt for e in good}) == 10
    assert all(e.params == {"max_new_tokens": 100} for e in good)
    assert good[0].id == "p00-r0" and good[-1].id == "p09-r9"


# --- OpenAI batch lines ----------------------------------------------------------


def openai_line(body: dict[str, Any], url: str = B.CHAT_URL, **extra: Any) -> dict[str, Any]:
    return {"custom_id": "req-1", "method": "POST", "url": url, "body": body, **extra}


CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


def test_openai_chat_line() -> None:
    line = one(openai_line({**CHAT_BODY, "max_tokens": 10, "temperature": 0.2, "seed": 1}))
    assert line.id == "req-1" and line.is_openai and line.url == B.CHAT_URL
    assert line.model == "gpt-4o-mini"
    assert line.messages == [{"role": "user", "content": "Hello"}]
    assert line.params == {"max_new_tokens": 10, "temperature": 0.2, "seed": 1}


def test_openai_max_completion_tokens_and_extensions() -> None:
    body = {**CHAT_BODY, "max_completion_tokens": 4, "top_k": 3, "min_p": 0.1, "stop": "x"}
    assert one(openai_line(body)).params == {
        "max_new_tokens": 4,
        "top_k": 3,
        "min_p": 0.1,
        "stop": ["x"],
    }


def test_openai_both_max_tokens_fields_is_an_error() -> None:
    err = error_of(openai_line({**CHAT_BODY, "max_tokens": 4, "max_completion_tokens": 4}))
    assert "body.max_tokens" in err.message and "body.max_completion_tokens" in err.message


def test_openai_completions_line() -> None:
    line = one(openai_line({"model": "m", "prompt": "Once", "max_tokens": 5}, B.COMPLETIONS_URL))
    assert line.prompt == "Once" and line.url == B.COMPLETIONS_URL
    one_item_list = openai_line({"prompt": ["Once"]}, B.COMPLETIONS_URL)
    assert one(one_item_list).prompt == "Once"


def test_openai_content_parts_are_flattened() -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    body = {"messages": [{"role": "user", "content": parts, "name": "bob"}]}
    assert one(openai_line(body)).messages == [{"role": "user", "content": "Hello"}]


def test_openai_neutral_values_are_accepted() -> None:
    body = {
        **CHAT_BODY,
        "n": 1,
        "stream": False,
        "logprobs": False,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "response_format": {"type": "text"},
        "logit_bias": {},
        "tools": [],
        "user": "u",
        "metadata": {"k": "v"},
        "store": False,
    }
    params = one(openai_line(body)).params
    assert params == {"n": 1, "logprobs": False, "frequency_penalty": 0.0, "presence_penalty": 0.0}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({**CHAT_BODY, "n": 99}, "body.n"),
        ({**CHAT_BODY, "n": True}, "body.n"),
        ({**CHAT_BODY, "best_of": 2}, "only best_of=1"),
        ({**CHAT_BODY, "stream": True}, "streaming"),
        ({**CHAT_BODY, "logprobs": 3}, "body.logprobs"),
        ({**CHAT_BODY, "top_logprobs": 21}, "body.top_logprobs"),
        ({**CHAT_BODY, "presence_penalty": 2.5}, "body.presence_penalty"),
        ({**CHAT_BODY, "tools": [{"type": "function"}]}, "tool calling"),
        ({**CHAT_BODY, "response_format": {"type": "xml"}}, "body.response_format.type"),
        (
            {**CHAT_BODY, "response_format": {"type": "json_schema", "json_schema": {"x": 1}}},
            "body.response_format.json_schema",
        ),
        ({**CHAT_BODY, "temprature": 1}, "'temprature' (did you mean 'temperature'?)"),
        ({**CHAT_BODY, "temperature": 9000}, "body.temperature"),
        ({**CHAT_BODY, "max_tokens": -1}, "body.max_tokens"),
        ({"model": "m"}, "body.messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
        ({"messages": [{"role": "user", "content": "x"}], "prompt": "y"}, "'prompt'"),
    ],
)
def test_openai_bad_bodies(body: dict[str, Any], needle: str) -> None:
    err = error_of(openai_line(body))
    assert needle in err.message
    assert err.is_openai and err.id == "req-1"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"method": "POST", "url": B.CHAT_URL, "body": CHAT_BODY}, "custom_id is missing"),
        (openai_line(CHAT_BODY, method="GET"), "method"),
        (openai_line(CHAT_BODY, url="/v1/embeddings"), "/v1/embeddings"),
        (openai_line(CHAT_BODY, extra=1), "'extra'"),
        ({"custom_id": "r", "url": B.CHAT_URL, "body": "x"}, "body must be an object"),
        (openai_line({"prompt": ["a", "b"]}, B.COMPLETIONS_URL), "one prompt per line"),
        (
            openai_line({"prompt": [1, -2, 3]}, B.COMPLETIONS_URL),
            "body.prompt[1]: must be between 0",
        ),
        (openai_line({"prompt": [[1], [2]]}, B.COMPLETIONS_URL), "one prompt per line"),
        (openai_line({"model": "m"}, B.COMPLETIONS_URL), "body.prompt is missing"),
        (
            openai_line({"messages": [{"role": "user", "content": "x"}]}, B.COMPLETIONS_URL),
            "'messages'",
        ),
    ],
)
def test_openai_bad_lines(line: dict[str, Any], needle: str) -> None:
    err = error_of(line)
    assert needle in err.message and err.is_openai


def test_openai_duplicate_custom_id() -> None:
    entries = parse_all(openai_line(CHAT_BODY), openai_line(CHAT_BODY))
    assert isinstance(entries[1], B.LineError) and entries[1].is_openai
    assert "duplicate id 'req-1'" in entries[1].message


def test_unparseable_line_takes_the_style_of_the_file() -> None:
    entries = parse_all(openai_line(CHAT_BODY), "{oops")
    assert isinstance(entries[1], B.LineError) and entries[1].is_openai
    assert not error_of("{oops").is_openai


# --- output ----------------------------------------------------------------------


def test_plain_output_shape() -> None:
    line = one({"id": "a", "prompt": "hi"})
    out = B.format_result(line, FakeResult("a"))
    assert out == {
        "id": "a",
        "text": "hello",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "error": None,
    }


def test_plain_output_of_a_failure() -> None:
    line = one({"id": "a", "prompt": "hi"})
    failed = FakeResult("a", "", "error", 0, 0, errors.WorkerDied("crashed 3 workers"))
    out = B.format_result(line, failed)
    assert out["error"] == {"code": "worker_died", "message": "crashed 3 workers"}
    assert out["finish_reason"] == "error" and out["text"] == ""


def test_openai_chat_output_shape() -> None:
    line = one(openai_line({**CHAT_BODY, "max_tokens": 10}))
    result = FakeResult("req-1", finish_reason="length", model="SmolLM2-135M-Instruct")
    out = B.format_result(line, result, now=1711652795.5)
    assert list(out) == ["id", "custom_id", "response", "error"]
    assert out["id"].startswith("batch_req_") and out["custom_id"] == "req-1"
    assert out["error"] is None
    response = out["response"]
    assert list(response) == ["status_code", "request_id", "body"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    body = response["body"]
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["created"] == 1711652795
    assert body["model"] == "SmolLM2-135M-Instruct", "the served model, not the one asked for"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_openai_completions_output_shape() -> None:
    line = one(openai_line({"prompt": "Once"}, B.COMPLETIONS_URL))
    body = B.format_result(line, FakeResult("req-1"))["response"]["body"]
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == B.DEFAULT_MODEL_NAME
    assert body["choices"] == [
        {"index": 0, "text": "hello", "logprobs": None, "finish_reason": "stop"}
    ]


def test_openai_output_of_a_failure() -> None:
    line = one(openai_line(CHAT_BODY))
    failed = FakeResult("req-1", "", "error", error=errors.EngineError("boom"))
    out = B.format_result(line, failed)
    assert out["error"] is None
    assert out["response"]["status_code"] == 500
    assert out["response"]["body"] == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "engine_error"}
    }
    assert out["custom_id"] == "req-1" and out["id"].startswith("batch_req_")


@pytest.mark.parametrize(
    ("error", "status", "param"),
    [
        (errors.ModelNotFound("model 'x' is not served"), 404, "model"),
        (errors.BadRequest("bad", field="messages"), 400, "messages"),
        (errors.PromptTooLong("too long"), 400, "messages"),
        (errors.WorkerDied("poison"), 500, None),
    ],
)
def test_openai_http_like_failures(error: errors.RequestFailed, status: int, param: str | None):
    out = B.format_result(
        one(openai_line(CHAT_BODY)), FakeResult("req-1", "", "error", error=error)
    )
    assert out["response"]["status_code"] == status and out["error"] is None
    assert out["response"]["body"]["error"]["param"] == param
    code = "context_length_exceeded" if error.code == "prompt_too_long" else error.code
    assert out["response"]["body"]["error"]["code"] == code  # as the HTTP answer's
    assert B.output_record_status(out) == ("req-1", False)  # resume retries it


@pytest.mark.parametrize("error", [errors.Cancelled("by you"), errors.DeadlineExceeded("late")])
def test_openai_batch_level_failures_have_no_response(error: errors.RequestFailed):
    out = B.format_result(
        one(openai_line(CHAT_BODY)), FakeResult("req-1", "", "error", error=error)
    )
    assert out["response"] is None
    assert out["error"] == {"code": error.code, "message": error.message}


def test_openai_lines_send_their_model_with_the_item() -> None:
    assert one(openai_line(CHAT_BODY)).to_item()["model"] == "gpt-4o-mini"
    assert "model" not in one(openai_line({"messages": CHAT_BODY["messages"]})).to_item()
    assert "body.model" in error_of(openai_line({**CHAT_BODY, "model": 7})).message


def test_a_plain_lines_timeout_goes_with_its_item() -> None:
    assert one({"prompt": "x", "timeout_s": 2.5}).to_item()["timeout_s"] == 2.5
    assert "timeout_s" not in one({"prompt": "x"}).to_item()
    assert "timeout_s" in error_of({"prompt": "x", "timeout_s": 0}).message


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"id": "s", "prompt": "scraped \\ud800 text"}', "prompt"),
        (
            '{"id": "s", "messages": [{"role": "user", "content": "\\uDC00"}]}',
            "messages[0].content",
        ),
        (
            '{"custom_id": "s", "url": "/v1/chat/completions", "body": {"messages": '
            '[{"role": "user", "content": "x\\udfff"}]}}',
            "body.messages[0].content",
        ),
    ],
)
def test_a_lone_surrogate_is_a_per_line_error_naming_the_field(line: str, field: str) -> None:
    entries = list(
        B.read_batch(
            [json.dumps({"id": "ok", "prompt": "fine"}), line, b'{"prompt": "\\ud83d\\ude00 ok"}']
        )
    )
    good, bad, pair = entries
    assert isinstance(good, B.BatchLine) and isinstance(
        pair, B.BatchLine
    )  # a surrogate pair is fine
    assert isinstance(bad, B.LineError) and bad.id == "s" and bad.line_no == 2
    assert f"{field}: holds a lone surrogate" in bad.message


def test_openai_output_ids_are_unique() -> None:
    line = one(openai_line(CHAT_BODY))
    outs = [B.format_result(line, FakeResult("req-1")) for _ in range(50)]
    assert len({o["id"] for o in outs}) == 50
    assert len({o["response"]["request_id"] for o in outs}) == 50


def test_line_error_output_plain_and_openai() -> None:
    plain = B.format_line_error(error_of({"id": "a", "prompt": "x", "temprature": 1}))
    assert plain["id"] == "a" and plain["finish_reason"] == "error"
    assert plain["error"]["code"] == "bad_request" and plain["error"]["line"] == 1
    assert "temprature" in plain["error"]["message"]
    oai = B.format_line_error(error_of(openai_line({**CHAT_BODY, "best_of": 3})))
    # As the HTTP endpoint answers the same body: a 400 naming the field.
    assert oai["custom_id"] == "req-1" and oai["error"] is None
    assert oai["response"]["status_code"] == 400
    error = oai["response"]["body"]["error"]
    assert (error["code"], error["param"], error["line"]) == ("bad_request", "best_of", 1)
    assert error["type"] == "invalid_request_error" and "best_of=1" in error["message"]


def test_writer_writes_one_flushed_line_each(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        writer = B.ResultWriter(f)
        writer.write_result(one({"id": "a", "prompt": "x"}), FakeResult("a", text="naïve\nline"))
        # flushed already: visible before close
        assert path.read_text(encoding="utf-8").count("\n") == 1
        writer.write_line_error(error_of("{bad"))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["text"] == "naïve\nline"
    assert "naïve" in lines[0]  # not \u-escaped
    assert json.loads(lines[1])["id"] == "line-1"


# --- resume ----------------------------------------------------------------------


def write_lines(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def ok_record(item_id: str) -> dict[str, Any]:
    return B.format_result(one({"id": item_id, "prompt": "x"}), FakeResult(item_id))


def failed_record(item_id: str) -> dict[str, Any]:
    failed = FakeResult(item_id, "", "error", error=errors.WorkerDied("x"))
    return B.format_result(one({"id": item_id, "prompt": "x"}), failed)


def test_resume_missing_file_is_empty(tmp_path: Path) -> None:
    state = B.prepare_resume(tmp_path / "none.jsonl")
    assert state.done == set() and not (tmp_path / "none.jsonl").exists()


def test_resume_collects_done_ids_and_leaves_a_clean_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_lines(path, [ok_record("a"), ok_record("b")])
    before = path.read_bytes()
    state = B.prepare_resume(path)
    assert state.done == {"a", "b"} and not state.dropped_partial
    assert path.read_bytes() == before


def test_resume_truncates_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_lines(path, [ok_record("a"), ok_record("b")], tail='{"id": "c", "te')
    state = B.prepare_resume(path)
    assert state.done == {"a", "b"} and state.dropped_partial
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and '"c"' not in text
    assert len(text.splitlines()) == 2


def test_resume_drops_a_complete_json_last_line_without_newline(tmp_path: Path) -> None:
    # Without its newline we cannot know the write finished; running it again is safe.
    path = tmp_path / "out.jsonl"
    write_lines(path, [ok_record("a")], tail=json.dumps(ok_record("b")))
    assert B.prepare_resume(path).done == {"a"}
    assert len(path.read_text(encoding="utf-8").splitlines()) == 1


def test_resume_drops_failures_so_they_run_again(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    bad = B.format_line_error(error_of({"id": "m", "prompt": "x", "temprature": 1}))
    write_lines(path, [ok_record("a"), failed_record("b"), bad, ok_record("c")], tail='{"id"')
    state = B.prepare_resume(path)
    assert state.done == {"a", "c"} and state.dropped_errors == 2 and state.dropped_partial
    ids = [json.loads(x)["id"] for x in path.read_text(encoding="utf-8").splitlines()]
    assert ids == ["a", "c"]
    assert not list(tmp_path.glob("*.resume-tmp"))


def test_resume_reads_openai_output(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    line = one(openai_line(CHAT_BODY))
    good = B.format_result(line, FakeResult("req-1"))
    failed = {
        **B.format_result(line, FakeResult("req-2", error=errors.Busy("x"))),
        "custom_id": "req-2",
    }
    write_lines(path, [good, failed])
    state = B.prepare_resume(path)
    assert state.done == {"req-1"} and state.dropped_errors == 1


def test_resume_keeps_lines_it_does_not_understand(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "error": null}\nnot json\n{"id": "b", "error": {}}\n')
    state = B.prepare_resume(path)
    assert state.done == {"a"} and state.unreadable == 1
    assert path.read_text() == '{"id": "a", "error": null}\nnot json\n'


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.booleans()), max_size=20),
    st.text(alphabet='{}":abc ', max_size=15),
)
def test_resume_then_append_gives_each_id_once(
    tmp_path_factory: pytest.TempPathFactory, runs: list[tuple[str, bool]], tail: str
) -> None:
    """Whatever an earlier run left, resume + running the rest gives every id once."""
    path = tmp_path_factory.mktemp("resume") / "out.jsonl"
    seen: set[str] = set()
    records = []
    for item_id, ok in runs:
        if item_id not in seen:  # an earlier run writes each id once
            seen.add(item_id)
            records.append(ok_record(item_id) if ok else failed_record(item_id))
    write_lines(path, records, tail=tail.replace("\n", ""))
    state = B.prepare_resume(path)
    with open(path, "a", encoding="utf-8") as f:
        writer = B.ResultWriter(f)
        for item_id in "abcdefgh":
            if item_id not in state.done:
                writer.write_result(one({"id": item_id, "prompt": "x"}), FakeResult(item_id))
    ids = [json.loads(x)["id"] for x in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(ids) == list("abcdefgh")


def test_a_token_id_prompt_is_sent_as_it_is() -> None:
    line = one(openai_line({"prompt": [5, 0, 17], "max_tokens": 2}, B.COMPLETIONS_URL))
    assert line.prompt == [5, 0, 17] and line.to_item()["prompt"] == [5, 0, 17]
    assert one(openai_line({"prompt": [[5, 6]]}, B.COMPLETIONS_URL)).prompt == [5, 6]


def test_a_plain_line_that_asks_for_its_prompt_gets_it() -> None:
    from exgen.client.calls import PromptEcho, Result

    line = one({"id": "a", "prompt": "x y", "echo": True, "max_tokens": 0})
    result = Result("a", "", "length", 2, 0, prompt=PromptEcho([4, 5], "x y"))
    record = B.format_result(line, result)
    assert record["prompt"] == {"ids": [4, 5], "text": "x y", "logprobs": None}
