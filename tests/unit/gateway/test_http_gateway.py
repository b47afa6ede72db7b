"""The gateway's pure parts: options, request mapping, errors, keys, the job store,
file validation, and the keeper (with real child processes)."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionChunk

from exgen.client import errors
from exgen.client.client import Result
from exgen.daemon import config as cfg
from exgen.daemon.gateway import store as S
from exgen.daemon.gateway.__main__ import main as gateway_main
from exgen.daemon.gateway.auth import ApiKeys
from exgen.daemon.gateway.batches import check_metadata, window_seconds
from exgen.daemon.gateway.completions import ChunkWriter, parse_body
from exgen.daemon.gateway.errors import ApiError, bad_body, from_exgen_error, from_request_failed
from exgen.daemon.gateway.options import GatewayOptions, GatewayUnusable, local_address
from exgen.daemon.gateway.validate import LineRefused, check_line, validate_file
from exgen.daemon.supervisor.gateway_keeper import GatewayKeeper

CHAT_URL = "/v1/chat/completions"


def options(tmp_path: Path, **changes: object) -> GatewayOptions:
    base = GatewayOptions(router="ipc:///x.sock", listen="127.0.0.1:0", state_dir=str(tmp_path))
    for name, value in changes.items():
        setattr(base, name, value)
    return base


# --- options -------------------------------------------------------------------------


def test_options_survive_the_command_line(tmp_path: Path) -> None:
    original = options(tmp_path, api_keys_file="/k", max_inflight=7, request_timeout_s=2.5)
    ctx = gateway_main.make_context("gateway", original.to_argv())
    params = {k: v for k, v in ctx.params.items() if k != "parent_pid"}
    assert GatewayOptions(**params) == original


def test_options_from_settings(tmp_path: Path) -> None:
    settings = cfg.Settings(http="8123", http_state_dir=str(tmp_path), http_max_inflight=3)
    got = GatewayOptions.from_settings(settings, "tcp://0.0.0.0:5555")
    assert (got.router, got.listen, got.max_inflight) == ("tcp://127.0.0.1:5555", "8123", 3)
    assert got.host_port == ("127.0.0.1", 8123)
    assert local_address("ipc:///run/x.sock") == "ipc:///run/x.sock"


def test_preflight_refuses_what_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(GatewayUnusable, match="http_api_keys_file"):
        options(tmp_path, listen="0.0.0.0:0").preflight()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GatewayUnusable, match=str(port)):
            options(tmp_path, listen=f"127.0.0.1:{port}").preflight()
    with pytest.raises(GatewayUnusable, match="cannot read"):
        options(tmp_path, api_keys_file=str(tmp_path / "none")).preflight()
    options(tmp_path).preflight()


def test_http_settings_are_checked() -> None:
    with pytest.raises(cfg.ConfigError, match="http = 'x:y'"):
        cfg.load_settings(None, {"http": "x:y"}, environ={})
    with pytest.raises(cfg.ConfigError, match="http_max_inflight"):
        cfg.load_settings(None, {"http_max_inflight": 0}, environ={})
    env = {"EXGEN_HTTP_MAX_BODY_BYTES": "100", "EXGEN_API_KEY": "k", "EXGEN_HTTP_URL": "u"}
    assert cfg.load_settings(None, {}, environ=env).http_max_body_bytes == 100


# --- requests and answers --------------------------------------------------------------


def body(**fields: object) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


def test_a_body_maps_as_a_batch_line_does() -> None:
    parsed = parse_body(body(max_tokens=7, temperature=0.5, stop="x", top_k=3), CHAT_URL)
    assert parsed.item["params"] == {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "stop": ["x"],
        "top_k": 3,
    }
    assert parsed.item["messages"] == [{"role": "user", "content": "hi"}]
    assert not parsed.stream and parsed.id.startswith("chatcmpl-")
    streamed = parse_body(body(stream=True, stream_options={"include_usage": True}), CHAT_URL)
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 17}, "n"),
        ({"n": 2, "stream": True}, "n"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        ({"temprature": 1}, "temprature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "include_usage"),
        ({"max_tokens": 1, "max_completion_tokens": 2}, "max_tokens"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(body(**fields), CHAT_URL)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_errors_map_to_statuses() -> None:
    cases = [
        (errors.PromptTooLong("long"), 400, "context_length_exceeded", None),
        (errors.Busy("full"), 429, "busy", "1"),
        (errors.Draining("bye"), 503, "draining", "1"),
        (errors.WorkerDied("poison"), 500, "worker_died", None),
        (errors.BadRequest("bad", field="params.top_p"), 400, "bad_request", None),
        (errors.ModelNotFound("not here"), 404, "model_not_found", None),
        (errors.DeadlineExceeded("waited 1s"), 504, "timeout", None),
        (errors.ResultTooLarge("20 MiB"), 400, "too_large", None),
        (errors.Forbidden("not yours"), 403, "forbidden", None),
        (errors.Cancelled("by someone"), 503, "cancelled", "1"),
        (errors.ConnectTimeout("no handshake"), 503, "unavailable", "1"),
        (errors.Timeout("silent"), 503, "unavailable", "1"),
        (errors.UnsafeSocket("another user's"), 503, "unavailable", "1"),
        (errors.ProtocolMismatch("v1"), 502, "protocol", None),
    ]
    for exc, status, code, retry in cases:
        api = from_exgen_error(exc)
        assert (api.status, api.code, api.headers().get("Retry-After")) == (status, code, retry)
    assert from_request_failed(errors.BadRequest("x", field="params.top_p")).param == "top_p"
    assert from_request_failed(errors.ModelNotFound("x")).param == "model"
    assert from_request_failed(errors.ResultTooLarge("x")).param == "max_tokens"
    assert "http_request_timeout_s" in from_request_failed(errors.DeadlineExceeded("x")).message
    assert bad_body("body.n=2: only n=1").param == "n"
    assert bad_body("unknown key body.'foo' (did you mean 'top_p'?)").param == "foo"


def test_stream_chunks_validate_as_the_sdks_type() -> None:
    parsed = parse_body(body(stream=True, stream_options={"include_usage": True}), CHAT_URL)
    writer = ChunkWriter(parsed, "served")
    result = Result("x", "a b", "length", prompt_tokens=2, completion_tokens=2)
    raw = writer.first("a b") + writer.text("a b") + writer.last(result)
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert [c.choices[0].delta.content for c in chunks[:2]] == ["", "a b"]
    assert chunks[2].choices[0].finish_reason == "length"
    assert chunks[3].usage is not None and chunks[3].usage.total_tokens == 4
    assert {c.model for c in chunks} == {"served"}


def test_batch_request_fields() -> None:
    assert window_seconds("24h") == 86400 and window_seconds("90s") == 90
    for bad in ("24", "0h", "1d", 24):
        with pytest.raises(ApiError):
            window_seconds(bad)
    assert check_metadata({"a": "b"}) == '{"a": "b"}' and check_metadata(None) is None
    with pytest.raises(ApiError):
        check_metadata({str(i): "v" for i in range(17)})


# --- keys --------------------------------------------------------------------------------


def test_keys_check_and_a_failed_reload_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# mine\nk1\n\nk2\n")
    keys = ApiKeys(str(path))
    keys.check("Bearer k2")
    for header in (None, "k1", "Bearer", "Bearer k3", "Basic k1"):
        with pytest.raises(ApiError) as caught:
            keys.check(header)
        assert caught.value.status == 401
    path.write_text("# nothing\n")
    keys.reload()
    keys.check("Bearer k1")
    path.unlink()
    keys.reload()
    keys.check("Bearer k1")
    ApiKeys(None).check(None)


# --- the store and validation -----------------------------------------------------------


def test_validation_rules() -> None:
    good = {"custom_id": "a", "method": "POST", "url": CHAT_URL, "body": {"model": "m"}}
    assert check_line(json.dumps(good).encode(), CHAT_URL) == ("a", "m")
    for change, code in [
        ({"custom_id": 5}, "invalid_request"),
        ({"method": "GET"}, "invalid_request"),
        ({"url": "/v1/completions"}, "mismatched_endpoint"),
        ({"body": []}, "invalid_request"),
    ]:
        with pytest.raises(LineRefused) as caught:
            check_line(json.dumps({**good, **change}).encode(), CHAT_URL)
        assert caught.value.code == code
    with pytest.raises(LineRefused, match="JSON"):
        check_line(b"[1]", CHAT_URL)


def batch_row(batch_id: str, status: str) -> dict[str, object]:
    return {"id": batch_id, "status": status, "endpoint": CHAT_URL, "input_file_id": "f",
            "completion_window": "24h", "created_at": 1}  # fmt: skip


def test_validate_file_records_offsets_and_the_store_commits(tmp_path: Path) -> None:
    store = S.Store(tmp_path)
    lines = [
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT_URL, "body": {}})
        for i in range(5)
    ]
    text = lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n"
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    store.add_batch(batch_row("b", "validating"))
    outcome = validate_file(store.db_path, "b", path, CHAT_URL, 10)
    assert (outcome.total, outcome.error_count) == (5, 0)
    pending = list(store.iter_pending("b", chunk=2))
    assert [n for n, _ in pending] == [1, 3, 4, 5, 6]
    raw = path.read_bytes()
    for _, offset in pending:
        assert raw[offset:].startswith(b'{"custom_id"')
    counts = {"completed": 1, "failed": 1, "input_tokens": 3, "output_tokens": 4,
              "out_bytes": 10, "err_bytes": 20}  # fmt: skip
    store.commit_progress("b", [(S.OK, 1), (S.FAILED, 4)], counts)
    assert [n for n, _ in store.iter_pending("b")] == [3, 5, 6]
    row = store.get_batch("b")
    assert row is not None and (row["completed"], row["failed"], row["err_bytes"]) == (1, 1, 20)
    too_many = validate_file(store.db_path, "b", path, CHAT_URL, 3)
    assert too_many.errors[0]["code"] == "too_many_requests"
    assert list(store.iter_pending("b")) == []  # a failed validation leaves no lines
    store.close()


def test_one_gateway_per_state_dir(tmp_path: Path) -> None:
    store = S.Store(tmp_path)
    with pytest.raises(S.StateDirInUse, match="in use by another exgen gateway"):
        S.Store(tmp_path)
    with pytest.raises(GatewayUnusable, match="in use by another exgen gateway"):
        options(tmp_path).preflight()
    store.close()
    S.Store(tmp_path).close()


def test_batches_list_newest_first_with_after(tmp_path: Path) -> None:
    store = S.Store(tmp_path)
    for i in range(5):
        store.add_batch(batch_row(f"b{i}", "completed"))
    assert [r["id"] for r in store.list_batches(None, True, 2)] == ["b4", "b3"]
    after_b3 = store.rowid("batches", "b3")
    assert [r["id"] for r in store.list_batches(after_b3, True, 10)] == ["b2", "b1", "b0"]
    assert [r["id"] for r in store.list_batches(after_b3, False, 10)] == ["b4"]
    assert store.rowid("batches", "nothing") is None
    store.close()


# --- the keeper ------------------------------------------------------------------------------


def keeper_for(code: str) -> GatewayKeeper:
    return GatewayKeeper([sys.executable, "-c", code], backoff_s=0.1, backoff_max_s=0.4)


def poll_until(keeper: GatewayKeeper, predicate: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keeper.poll(time.monotonic())
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("the keeper never got there")


def test_the_keeper_restarts_a_dying_gateway_with_back_off() -> None:
    keeper = keeper_for("import sys; sys.exit(1)")
    keeper.start()
    first = keeper.pid
    poll_until(keeper, lambda: len(keeper.deaths) >= 3)
    assert keeper.pid != first and not keeper.gave_up
    assert keeper.next_start_at is None or keeper.next_start_at - time.monotonic() <= 0.4
    keeper.stop()


def test_the_keeper_gives_up_on_a_boot_error_and_stops_a_live_one() -> None:
    keeper = keeper_for("import sys; sys.exit(3)")
    keeper.start()
    poll_until(keeper, lambda: keeper.gave_up)
    assert keeper.proc is None and keeper.next_start_at is None
    alive = keeper_for("import time; time.sleep(60)")
    alive.start()
    proc = alive.proc
    alive.stop(timeout_s=5)
    assert proc is not None and proc.returncode is not None and alive.proc is None
    GatewayKeeper(None, 1, 1).start()  # no gateway configured: nothing happens
