"""exgen-client without a real daemon: usage errors, unreachable daemons, and the
submit/generate/status paths against a tiny fake router (a real ZMQ ROUTER socket
speaking protocol.py frames), so the CLI is tested end to end over the wire."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import CliRunner, Result

from exgen.client import protocol as P
from exgen.client.cli import cli
from exgen.client.cli_common import Stopped
from exgen.client.cli_status import format_status
from exgen.client.cli_submit import Tally
from exgen.client.core import TAG_SEP

STATUS_DOC: dict[str, Any] = {
    "workers": [
        {
            "slot": 0,
            "devices": [0],
            "pid": 4242,
            "state": "ready",
            "inflight": 3,
            "completed": 120,
            "restarts": 1,
            "tokens_per_s": 812.25,
            "engine": "synthetic",
            "capacity": 8,
            "load_s": 2.5,
        },
        {
            "slot": 1,
            "devices": [1, 2],
            "pid": None,
            "state": "restarting",
            "inflight": 0,
            "completed": 0,
            "restarts": 4,
            "tokens_per_s": 0.0,
            "engine": "synthetic",
            "capacity": 8,
            "load_s": None,
        },
    ],
    "queued": 17,
    "uptime_s": 3725.2,
    "inflight": 3,
    "engine": "synthetic",
    "model": "fake-model",
    "clients": [
        {
            "id": "c-1",
            "name": "exgen-client submit big.jsonl -o out.jsonl",
            "host": "node1",
            "pid": 777,
            "queued": 120,
            "running": 8,
            "done": 4000,
            "failed": 2,
            "unread": 0,
            "tokens_per_s": 950.5,
            "connected": True,
            "idle_s": 0.3,
        }
    ],
}


class FakeRouter:
    """Answers like the router: text = "echo:" + prompt; a prompt with FAIL fails."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.address = address
        self.received: list[dict[str, Any]] = []  # every item submitted (the caller's ids)
        self.commands: list[tuple[bytes, dict[str, Any]]] = []  # everything else
        self.fail_marker = "FAIL"
        self.mute_after: int | None = None  # results sent before going silent
        self.results_sent = 0
        self.reverse = False  # answer each submit's items last first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            command, body = P.unpack(frames)
            for reply_command, reply in self._answer(command, body):
                if self.mute_after is not None and self.results_sent >= self.mute_after:
                    continue  # as if the daemon hung or died
                self.results_sent += reply_command == P.RESULTS
                self.sock.send_multipart([ident, *P.pack(reply_command, reply)])

    def _answer(self, command: bytes, body: dict[str, Any]) -> list[tuple[bytes, dict[str, Any]]]:
        req = body.get("req")
        if command == P.STATUS:
            return [(P.STATUS_REPLY, {**STATUS_DOC, "req": req})]
        if command == P.PING:
            return [(P.PONG, {"req": req, "draining": False})]
        if command != P.SUBMIT:
            self.commands.append((command, body))
            return self._control(command, body)
        submit = P.validate_submit(body)
        self.received.extend(untagged(item.to_wire()) for item in submit.items)
        out: list[tuple[bytes, dict[str, Any]]] = [
            (P.ACCEPTED, {"req": req, "n": len(submit.items), "queued": 0})
        ]
        for item in reversed(submit.items) if self.reverse else submit.items:
            text = "echo:" + (item.prompt or "")  # chat items: "echo:" alone
            if submit.stream:
                out.append(
                    (P.CHUNKS, {"req": req, "chunks": [[item.id, text[:3]], [item.id, text[3:]]]})
                )
            out.append((P.RESULTS, {"req": req, "results": [self._result(item, text)]}))
        return out

    def _control(self, command: bytes, body: dict[str, Any]) -> list[tuple[bytes, dict[str, Any]]]:
        req = body.get("req")
        if command == P.HELLO:
            return [(P.WELCOME, {"req": req, "instance": "fake", "model": "fake-model"})]
        if command == P.CANCEL and "client" in body:
            if body["client"] == "root-owned":
                return [(P.ERROR, P.error_body(P.E_FORBIDDEN, "not your client", req=req))]
            return [(P.CANCELLED, {"req": req, "cancelled": 3, "clients": [body["client"]]})]
        if command == P.CANCEL and body.get("clients") == "all":
            return [(P.CANCELLED, {"req": req, "cancelled": 5, "clients": ["a", "b"]})]
        return []

    def _result(self, item: P.Item, text: str) -> dict[str, Any]:
        if self.fail_marker in text:
            return P.result_error(item.id, P.E_WORKER_DIED, "crashed 3 workers")
        if item.model not in (None, "fake-model"):  # as a daemon with strict_model
            return P.result_error(item.id, P.E_MODEL_NOT_FOUND, f"model {item.model!r} not served")
        return {
            "id": item.id,
            "text": text,
            "finish_reason": "length" if item.params.get("max_new_tokens") == 1 else "stop",
            "prompt_tokens": 4,
            "completion_tokens": len(text),
            "slot": 0,
            "error": None,
        }


def untagged(wire: dict[str, Any]) -> dict[str, Any]:
    """An item as the caller gave it: the client's call tag taken off its id."""
    return {**wire, "id": wire["id"].partition(TAG_SEP)[2]}


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def router(tmp_path: Path) -> Iterator[FakeRouter]:
    fake = FakeRouter(f"ipc://{tmp_path / 'fake.sock'}")
    yield fake
    fake.close()


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin, catch_exceptions=False)


def write_jsonl(path: Path, *lines: Any) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# --- usage errors (exit 2) -------------------------------------------------------


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "x"})


def test_resume_needs_an_output_file(prompts: Path) -> None:
    result = run("submit", str(prompts), "--resume")
    assert result.exit_code == 2 and "--resume needs -o" in result.output


def test_existing_output_is_not_overwritten_silently(prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    result = run("submit", str(prompts), "-o", str(out))
    assert result.exit_code == 2 and "--resume" in result.output and "--overwrite" in result.output
    assert out.read_text() == "precious\n"


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),  # 0: the prompt only
        (["--stop", ""], "--stop"),
        (["--seed", "abc"], "--seed"),
        (["--timeout", "0"], "--timeout"),
    ],
)
def test_bad_option_values(prompts: Path, option: list[str], needle: str) -> None:
    result = run("submit", str(prompts), *option)
    assert result.exit_code == 2 and needle in result.output


def test_missing_input_file(tmp_path: Path) -> None:
    result = run("submit", str(tmp_path / "nope.jsonl"))
    assert result.exit_code == 2 and "nope.jsonl" in result.output


def test_unknown_command() -> None:
    assert run("sumbit").exit_code == 2


# --- an unreachable daemon (exit 3) ----------------------------------------------


@pytest.mark.parametrize("command", ["submit", "status", "generate"])
def test_unreachable_daemon_is_exit_3_naming_the_address(
    command: str, prompts: Path, tmp_path: Path
) -> None:
    address = free_tcp_address()
    target = {"submit": [str(prompts), "-o", str(tmp_path / "o.jsonl")], "generate": ["hi"]}
    result = run(command, *target.get(command, []), "--connect", address, "--timeout", "0.3")
    assert result.exit_code == 3
    assert address in result.output and "exgen serve" in result.output
    assert not (tmp_path / "o.jsonl").exists()  # nothing touched before the daemon answered


def test_unreachable_default_address_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    address = f"ipc://{tmp_path / 'nobody.sock'}"
    monkeypatch.setenv("EXGEN_ADDRESS", address)
    result = run("status", "--timeout", "0.3")
    assert result.exit_code == 3 and address in result.output


# --- submit against the fake router ----------------------------------------------


def test_submit_writes_every_result(router: FakeRouter, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl", *({"id": f"p{i}", "prompt": f"q{i}"} for i in range(50))
    )
    out = tmp_path / "out.jsonl"
    result = run("submit", str(src), "-o", str(out), "--connect", router.address)
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(50))
    assert {r["text"] for r in records} == {f"echo:q{i}" for i in range(50)}
    assert set(records[0]) == {
        "id",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "error",
    }
    assert "50 done, 0 failed" in result.stderr


def test_submit_to_stdout_from_stdin(router: FakeRouter) -> None:
    stdin = json.dumps({"prompt": "from stdin"}) + "\n"
    result = run("submit", "-", "--connect", router.address, stdin=stdin)
    assert result.exit_code == 0, result.output
    [record] = [json.loads(x) for x in result.stdout.splitlines()]
    assert record == {
        "id": "line-1",
        "text": "echo:from stdin",
        "finish_reason": "stop",
        "prompt_tokens": 4,
        "completion_tokens": 15,
        "error": None,
    }
    assert "1 done" in result.stderr and "\r" not in result.stderr  # no bar when piped


def test_dash_output_is_stdout(router: FakeRouter, prompts: Path) -> None:
    result = run("submit", str(prompts), "-o", "-", "--connect", router.address)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "a"
    assert not Path("-").exists()


def test_line_params_override_command_line_defaults(router: FakeRouter, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "x", "max_tokens": 1, "temperature": 0.0},
    )
    args = ["--max-new-tokens", "7", "--temperature", "0.5", "--stop", "A", "--stop", "B"]
    result = run("submit", str(src), "--connect", router.address, *args)
    assert result.exit_code == 0, result.output
    params = {item["id"]: item["params"] for item in router.received}
    assert params["a"] == {"max_new_tokens": 7, "temperature": 0.5, "stop": ["A", "B"]}
    assert params["b"] == {"max_new_tokens": 1, "temperature": 0.0, "stop": ["A", "B"]}


def test_malformed_lines_are_reported_and_answered(router: FakeRouter, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "x", "temprature": 0.5},
        "{broken",
        {"id": "a", "prompt": "again"},
        {"id": "c", "prompt": "FAIL me"},
    )
    out = tmp_path / "out.jsonl"
    result = run("submit", str(src), "-o", str(out), "--connect", router.address)
    assert result.exit_code == 1
    summary = result.stderr
    assert "1 done, 1 failed" in summary and "3 malformed lines" in summary
    assert "line 2: unknown key 'temprature'" in summary
    assert "c: worker_died: crashed 3 workers" in summary
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == ["a", "a", "b", "c", "line-3"]  # every line
    by_line = {r["error"]["line"]: r for r in records if r["error"] and "line" in r["error"]}
    assert by_line[2]["id"] == "b"
    assert by_line[4]["id"] == "a" and "line 4: duplicate id 'a'" in by_line[4]["error"]["message"]
    assert [i["id"] for i in router.received] == ["a", "c"]  # bad lines never sent


def test_resume_skips_done_and_retries_failures(router: FakeRouter, tmp_path: Path) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "a", "prompt": "one"},
        {"id": "b", "prompt": "FAIL two"},
        {"id": "c", "prompt": "three"},
    )
    out = tmp_path / "out.jsonl"
    first = run("submit", str(src), "-o", str(out), "--connect", router.address)
    assert first.exit_code == 1
    with open(out, "a") as f:
        f.write('{"id": "c", "tex')  # as if killed mid-write
    router.fail_marker = "NEVER"
    router.received.clear()
    again = run("submit", str(src), "-o", str(out), "--resume", "--connect", router.address)
    assert again.exit_code == 0, again.output
    assert [i["id"] for i in router.received] == ["b"]
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == ["a", "b", "c"]
    assert all(r["error"] is None for r in records)
    assert "2 skipped" in again.stderr


def test_daemon_lost_mid_run_is_exit_3(router: FakeRouter, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", *({"prompt": f"q{i}"} for i in range(20)))
    out = tmp_path / "out.jsonl"
    router.mute_after = 5
    result = run(
        "submit", str(src), "-o", str(out), "--connect", router.address, "--timeout", "0.5"
    )
    assert result.exit_code == 3
    assert "lost the daemon" in result.stderr and "--resume" in result.stderr
    assert "5 done" in result.stderr
    assert len(read_jsonl(out)) == 5


@pytest.mark.parametrize(
    ("stop", "code"),
    [(KeyboardInterrupt(), 130), (Stopped(signal.SIGTERM), 143), (Stopped(signal.SIGHUP), 129)],
)
def test_a_stopped_run_cancels_what_is_in_flight(
    router: FakeRouter,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop: BaseException,
    code: int,
) -> None:
    real_add = Tally.add

    def stopped_at_two(self: Tally, result: Any) -> None:
        real_add(self, result)
        if self.done == 2:
            raise stop

    monkeypatch.setattr(Tally, "add", stopped_at_two)
    router.mute_after = 4  # the others stay in flight
    src = write_jsonl(tmp_path / "in.jsonl", *({"id": f"p{i}", "prompt": "q"} for i in range(10)))
    out = tmp_path / "out.jsonl"
    result = run("submit", str(src), "-o", str(out), "--connect", router.address)
    assert result.exit_code == code and "--resume" in result.stderr
    written = {r["id"] for r in read_jsonl(out)}
    cancelled = [
        untagged({"id": i})["id"] for c, b in router.commands if c == P.CANCEL for i in b["ids"]
    ]
    assert written == {"p0", "p1"}
    unanswered = {f"p{i}" for i in range(4, 10)}  # the router answered p0..p3
    assert unanswered <= set(cancelled) <= unanswered | {"p2", "p3"}


def test_overwrite_replaces_the_output(router: FakeRouter, prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    result = run("submit", str(prompts), "-o", str(out), "--overwrite", "--connect", router.address)
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_jsonl(out)] == ["a"]


def test_openai_lines_get_openai_output(router: FakeRouter, tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    src = write_jsonl(
        tmp_path / "in.jsonl",
        {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "r2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "FAIL"}},
    )
    out = tmp_path / "out.jsonl"
    result = run("submit", str(src), "-o", str(out), "--connect", router.address)
    assert result.exit_code == 1
    records = {r["custom_id"]: r for r in read_jsonl(out)}
    body = records["r1"]["response"]["body"]
    assert body["model"] == "fake-model"  # the daemon's, as the line named none
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo:"}
    assert records["r2"]["error"] is None  # OpenAI's error-file shape: an HTTP-like answer
    assert records["r2"]["response"]["status_code"] == 500
    assert records["r2"]["response"]["body"]["error"]["code"] == "worker_died"


# --- generate and status ---------------------------------------------------------


def test_generate_prints_the_text(router: FakeRouter) -> None:
    result = run("generate", "hello", "--connect", router.address, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout == "echo:hello\n"
    assert router.received[0]["params"] == {"seed": 3}


def test_generate_streams_chunks(router: FakeRouter) -> None:
    result = run("generate", "hello", "--stream", "--connect", router.address)
    assert result.exit_code == 0, result.output
    assert result.stdout == "echo:hello\n"


def test_generate_chat_with_system(router: FakeRouter) -> None:
    result = run("generate", "hi", "--system", "be brief", "--connect", router.address)
    assert result.exit_code == 0, result.output
    assert router.received[0]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_generate_failure_is_exit_1(router: FakeRouter) -> None:
    result = run("generate", "FAIL", "--connect", router.address)
    assert result.exit_code == 1 and "worker_died" in result.stderr


def test_status_json(router: FakeRouter) -> None:
    result = run("status", "--json", "--connect", router.address)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == STATUS_DOC


def test_status_table(router: FakeRouter) -> None:
    result = run("status", "--connect", router.address)
    assert result.exit_code == 0, result.output
    assert result.stdout == format_status(STATUS_DOC) + "\n"


def test_format_status() -> None:
    lines = format_status(STATUS_DOC).splitlines()
    assert lines[0].split() == [
        "slot",
        "devices",
        "pid",
        "state",
        "inflight",
        "completed",
        "restarts",
        "tok/s",
        "load",
    ]
    assert lines[1].split() == ["0", "0", "4242", "ready", "3", "120", "1", "812.2", "2.5s"]
    assert lines[2].split() == ["1", "1,2", "-", "restarting", "0", "0", "4", "0.0", "-"]
    facts = next(line for line in lines if line.startswith("engine "))
    assert "queued 17" in facts and "uptime 1h02m05s" in facts
    assert "model fake-model" in facts


def test_format_status_shows_prefix_hits_where_an_engine_counts_them() -> None:
    workers = [dict(w) for w in STATUS_DOC["workers"]]
    workers[0]["counters"] = {"prefix_hits": 96, "prefill_tokens_saved": 38400}
    lines = format_status({**STATUS_DOC, "workers": workers}).splitlines()
    assert lines[0].split()[-4:] == ["prefix", "hits", "prefill", "saved"]
    assert lines[1].split()[-2:] == ["96", "38400"]
    assert lines[2].split()[-2:] == ["-", "-"]
    assert "prefix" not in format_status(STATUS_DOC).splitlines()[0]


# --- options, jobs, papercuts ----------------------------------------------------------


def test_version_of_both_commands() -> None:
    from exgen.daemon.cli import main as exgen_main

    assert run("--version").output.startswith("exgen-client, version ")
    out = CliRunner().invoke(exgen_main, ["--version"])
    assert out.exit_code == 0 and out.output.startswith("exgen, version ")


@pytest.mark.parametrize("command", [[], ["submit"], ["status"], ["cancel"]])
def test_help_lists_the_exit_codes(command: list[str]) -> None:
    text = run(*command, "--help").output
    assert "Exit status:" in text
    starts = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert {"0", "1", "2", "3", "4", "130"} <= starts, text


def test_help_texts_say_what_the_options_do() -> None:
    submit_help = " ".join(run("submit", "--help").output.split())
    assert "Results file (default: stdout; - is stdout too)." in submit_help
    bench_help = " ".join(run("bench", "--help").output.split())
    assert "Default 64 for generated prompts" in bench_help and "Default 256." not in bench_help


def test_output_into_a_missing_directory_is_a_usage_error_before_any_work(
    router: FakeRouter, prompts: Path, tmp_path: Path
) -> None:
    for option in ("-o", "--errors"):
        result = run("submit", str(prompts), option, str(tmp_path / "no" / "out.jsonl"),
                     "--connect", router.address)  # fmt: skip
        assert result.exit_code == 2 and "does not exist" in result.output, result.output
        assert "Traceback" not in result.output
    assert router.received == [], "nothing may be sent before the output is known good"


def test_an_empty_input_file_warns(router: FakeRouter, tmp_path: Path) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    result = run("submit", str(src), "--connect", router.address)
    assert result.exit_code == 0
    assert "warning: " in result.stderr and "holds no prompts" in result.stderr


def test_generate_from_stdin_drops_the_final_newline_only(router: FakeRouter) -> None:
    result = run("generate", "-", "--connect", router.address, stdin="two\nlines\n")
    assert result.exit_code == 0, result.output
    assert router.received[0]["prompt"] == "two\nlines"


def test_output_order_input_keeps_the_lines_order(router: FakeRouter, tmp_path: Path) -> None:
    router.reverse = True
    lines = [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(30)]
    lines.insert(7, "{broken")  # a malformed line keeps its place too
    src = write_jsonl(tmp_path / "in.jsonl", *lines)
    for order, expect_sorted in (("completion", False), ("input", True)):
        out = tmp_path / f"{order}.jsonl"
        result = run("submit", str(src), "-o", str(out), "--output-order", order,
                     "--window", "8", "--connect", router.address)  # fmt: skip
        assert result.exit_code == 1, result.output  # the malformed line
        ids = [r["id"] for r in read_jsonl(out)]
        wanted = [*(f"p{i}" for i in range(7)), "line-8", *(f"p{i}" for i in range(7, 30))]
        assert (ids == wanted) is expect_sorted, (order, ids)


def test_errors_file_takes_the_failed_and_malformed_lines(
    router: FakeRouter, tmp_path: Path
) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    src = write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "good", "prompt": "x"},
        {"id": "bad", "prompt": "FAIL"},
        {"id": "typo", "prompt": "x", "temprature": 1},
        {"custom_id": "o-good", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "o-404", "url": "/v1/chat/completions", "body": {**chat, "model": "gpt-9"}},
    )
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    result = run(
        "submit", str(src), "-o", str(out), "--errors", str(errs), "--connect", router.address
    )
    assert result.exit_code == 1
    good = read_jsonl(out)
    assert sorted(r.get("id") if "text" in r else r["custom_id"] for r in good) == [
        "good",
        "o-good",
    ]
    failed = {r.get("custom_id") or r["id"]: r for r in read_jsonl(errs)}
    assert set(failed) == {"bad", "typo", "o-404"}
    not_found = failed["o-404"]["response"]
    assert not_found["status_code"] == 404
    assert not_found["body"]["error"]["code"] == "model_not_found"
    assert not_found["body"]["error"]["param"] == "model"
    assert {i["id"]: i.get("model") for i in router.received}["o-404"] == "gpt-9"
    again = run(
        "submit", str(src), "-o", str(out), "--errors", str(errs), "--connect", router.address
    )
    assert again.exit_code == 2 and "--resume" in again.output  # both files are guarded


def test_request_timeout_goes_with_each_line_unless_it_has_its_own(
    router: FakeRouter, tmp_path: Path
) -> None:
    src = write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "x", "timeout_s": 2},
    )
    result = run("submit", str(src), "--request-timeout", "30", "--connect", router.address)
    assert result.exit_code == 0, result.output
    assert {i["id"]: i["timeout_s"] for i in router.received} == {"a": 30, "b": 2}


def test_a_full_disk_is_one_line_exit_4_and_cancels_the_rest(
    router: FakeRouter, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", *({"id": f"p{i}", "prompt": "q"} for i in range(10)))
    router.mute_after = 3
    result = run("submit", str(src), "-o", "/dev/full", "--connect", router.address)
    assert result.exit_code == 4, result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("exgen-client:")]
    assert "cannot write /dev/full: No space left on device" in line and "--resume" in line
    assert "Traceback" not in result.output
    cancelled = [i for c, b in router.commands if c == P.CANCEL for i in b["ids"]]
    assert len(cancelled) >= 7


def test_the_client_says_hello_with_its_command_line(router: FakeRouter, prompts: Path) -> None:
    result = run("submit", str(prompts), "--connect", router.address)
    assert result.exit_code == 0, result.output
    [hello] = [b for c, b in router.commands if c == P.HELLO]
    assert set(hello) == {"req", "name", "host", "pid"} and hello["pid"] > 0


def test_status_shows_the_connected_clients(router: FakeRouter) -> None:
    text = run("status", "--connect", router.address).stdout
    lines = text.splitlines()
    header = lines.index(next(x for x in lines if x.startswith("client")))
    assert lines[header].split() == [
        "client", "host", "pid", "queued", "running", "done", "failed", "tok/s", "idle", "name"
    ]  # fmt: skip
    row = lines[header + 1]
    assert row.split()[:9] == ["c-1", "node1", "777", "120", "8", "4000", "2", "950.5", "0.3s"]
    assert row.endswith("exgen-client submit big.jsonl -o out.jsonl"), "the whole name, last"
    doc = json.loads(run("status", "--json", "--connect", router.address).stdout)
    assert doc["clients"][0]["name"] == "exgen-client submit big.jsonl -o out.jsonl"


def test_cancel_a_client_all_clients_and_a_refusal(router: FakeRouter) -> None:
    one = run("cancel", "exgen-client submit big.jsonl", "--connect", router.address)
    assert (
        one.exit_code == 0 and one.stdout == "cancelled 3 items of exgen-client submit big.jsonl\n"
    )
    everyone = run("cancel", "--all", "--connect", router.address)
    assert everyone.exit_code == 0 and everyone.stdout == "cancelled 5 items of a, b\n"
    refused = run("cancel", "root-owned", "--connect", router.address)
    assert refused.exit_code == 1
    assert refused.stderr == "exgen-client: not allowed: not your client\n"
    assert run("cancel", "--connect", router.address).exit_code == 2  # neither CLIENT nor --all
    assert run("cancel", "x", "--all", "--connect", router.address).exit_code == 2
    assert [b for c, b in router.commands if c == P.CANCEL][:2] == [
        {"client": "exgen-client submit big.jsonl", "req": ANY_REQ},
        {"clients": "all", "req": ANY_REQ},
    ]


class _AnyReq:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_REQ = _AnyReq()


def test_generate_into_a_full_disk_is_exit_4(router: FakeRouter) -> None:
    import subprocess
    import sys

    command = [sys.executable, "-m", "exgen.client.cli", "generate", "hello"]
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [*command, "--connect", router.address],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 4, run.stderr
    assert "cannot write the output: No space left on device" in run.stderr
    assert "Traceback" not in run.stderr
