"""exgen-client without a real daemon: usage errors, unreachable daemons, and the
submit/generate/status paths against a tiny fake router (a real ZMQ ROUTER socket
speaking protocol.py frames), so the CLI is tested end to end over the wire."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import CliRunner, Result

from exgen.client import protocol as P
from exgen.client.cli import cli, format_status
from exgen.client.client import Client

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
}


class FakeRouter:
    """Answers like the router: text = "echo:" + prompt; a prompt with FAIL fails."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.address = address
        self.received: list[dict[str, Any]] = []  # every item submitted
        self.fail_marker = "FAIL"
        self.mute_after: int | None = None  # results sent before going silent
        self.results_sent = 0
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
            return []
        submit = P.validate_submit(body)
        self.received.extend(item.to_wire() for item in submit.items)
        out: list[tuple[bytes, dict[str, Any]]] = [
            (P.ACCEPTED, {"req": req, "n": len(submit.items), "queued": 0})
        ]
        for item in submit.items:
            text = "echo:" + (item.prompt or "")  # chat items: "echo:" alone
            if submit.stream:
                out.append(
                    (P.CHUNKS, {"req": req, "chunks": [[item.id, text[:3]], [item.id, text[3:]]]})
                )
            out.append((P.RESULTS, {"req": req, "results": [self._result(item, text)]}))
        return out

    def _result(self, item: P.Item, text: str) -> dict[str, Any]:
        if self.fail_marker in text:
            return P.result_error(item.id, P.E_WORKER_DIED, "crashed 3 workers")
        return {
            "id": item.id,
            "text": text,
            "finish_reason": "length" if item.params.get("max_new_tokens") == 1 else "stop",
            "prompt_tokens": 4,
            "completion_tokens": len(text),
            "slot": 0,
            "error": None,
        }


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
        (["--max-new-tokens", "0"], "--max-new-tokens"),
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
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"a", "b", "line-3", "line-4", "c"}  # every input line answered
    assert records["b"]["error"]["line"] == 2
    assert records["line-4"]["error"]["message"].startswith("line 4: duplicate id 'a'")
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


def test_interrupt_cancels_what_is_in_flight(
    router: FakeRouter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_iter_results = Client.iter_results
    cancelled: list[str] = []

    def interrupted_after_two(self: Client, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for n, res in enumerate(real_iter_results(self, *args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield res

    monkeypatch.setattr(Client, "iter_results", interrupted_after_two)
    monkeypatch.setattr(Client, "cancel", lambda self, ids: cancelled.extend(ids))
    src = write_jsonl(tmp_path / "in.jsonl", *({"id": f"p{i}", "prompt": "q"} for i in range(10)))
    out = tmp_path / "out.jsonl"
    result = run("submit", str(src), "-o", str(out), "--connect", router.address)
    assert result.exit_code == 130 and "--resume" in result.stderr
    written = {r["id"] for r in read_jsonl(out)}
    assert len(written) == 2
    assert written.isdisjoint(cancelled) and len(written) + len(cancelled) == 10


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
    assert records["r2"]["response"] is None
    assert records["r2"]["error"]["code"] == "worker_died"


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
    assert "queued 17" in lines[-1] and "uptime 1h02m05s" in lines[-1]
    assert "model fake-model" in lines[-1]
