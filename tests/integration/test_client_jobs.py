"""Jobs end to end, against the router's side of protocol v2 (sessions,
jobs you can see and cancel, per-item deadlines, strict model names): a real daemon,
real `exgen-client` processes in two "terminals".

These need the router's v2 session features (HELLO answered with WELCOME, `clients`
in status, CANCEL of another client, `timeout_s`, `strict_model`). Until those are on
main each test skips, saying so; once they are, they must pass."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from exgen.client import Client, errors
from tests.conftest import EXGEN_CLIENT, RunningDaemon
from tests.integration.curve_support import start_curve_daemon

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, address: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXGEN_CLIENT, *args, "--connect", address],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def require_sessions(daemon: RunningDaemon) -> dict[str, Any]:
    """The WELCOME of a v2 router, or a skip naming what is missing."""
    with daemon.client() as client:
        client.status()
        welcome = client._core.welcome
    if welcome is None:
        pytest.skip("the router does not answer HELLO yet (its v2 sessions are not on main)")
    return welcome


def write_prompts(path: Path, n: int, tokens: int = 20) -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(
                json.dumps({"id": f"q{i}", "prompt": f"question {i}", "max_new_tokens": tokens})
            )
            fh.write("\n")


@pytest.fixture
def slow_daemon(daemon_factory) -> RunningDaemon:
    return daemon_factory("--engine", "synthetic", "--workers", "1", "--engine-opt", "token_ms=20")


def background_submit(tmp_path: Path, address: str, n: int = 400) -> subprocess.Popen[str]:
    write_prompts(tmp_path / "big.jsonl", n)
    out = tmp_path / "big-results.jsonl"
    command = [*EXGEN_CLIENT, "submit", str(tmp_path / "big.jsonl"), "-o", str(out)]
    proc = subprocess.Popen(
        [*command, "--connect", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while not out.exists() or len(out.read_text().splitlines()) < 5:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc


def the_submitter(status: dict[str, Any]) -> dict[str, Any]:
    [entry] = [c for c in status.get("clients", []) if "big.jsonl" in str(c.get("name"))]
    return entry


def test_status_shows_each_connected_client(slow_daemon, tmp_path):
    require_sessions(slow_daemon)
    proc = background_submit(tmp_path, slow_daemon.address)
    try:
        doc = json.loads(cli("status", "--json", address=slow_daemon.address).stdout)
        entry = the_submitter(doc)
        assert entry["name"].startswith("exgen-client submit") or "submit" in entry["name"]
        assert entry["pid"] == proc.pid and entry["host"]
        assert entry["queued"] + entry["running"] > 0 and entry["done"] >= 5
        table = cli("status", address=slow_daemon.address).stdout
        assert "big.jsonl" in table and str(proc.pid) in table
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_cancel_a_client_from_another_terminal(slow_daemon, tmp_path):
    require_sessions(slow_daemon)
    proc = background_submit(tmp_path, slow_daemon.address)
    entry = the_submitter(json.loads(cli("status", "--json", address=slow_daemon.address).stdout))
    cancelled = cli("cancel", entry["id"], address=slow_daemon.address)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith("cancelled ") and "big.jsonl" in cancelled.stdout
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr  # its items ended as cancelled
    results = [json.loads(x) for x in (tmp_path / "big-results.jsonl").read_text().splitlines()]
    assert len(results) == 400 and any(
        r["error"] and r["error"]["code"] == "cancelled" for r in results
    )
    status = slow_daemon.status()
    assert status["queued"] == 0 and status["inflight"] == 0


def test_cancel_all(slow_daemon, tmp_path):
    require_sessions(slow_daemon)
    proc = background_submit(tmp_path, slow_daemon.address)
    everyone = cli("cancel", "--all", address=slow_daemon.address)
    assert everyone.returncode == 0 and "big.jsonl" in everyone.stdout, everyone.stderr
    proc.communicate(timeout=60)
    assert proc.returncode == 1


def test_an_item_past_its_deadline_fails_with_timeout(slow_daemon):
    require_sessions(slow_daemon)
    with Client(slow_daemon.address) as client:
        late, quick = client.generate(
            [{"prompt": "slow", "params": {"max_new_tokens": 200}, "timeout_s": 0.5}, "quick"],
            max_new_tokens=2,
        )
    assert quick.ok
    assert isinstance(late.error, errors.DeadlineExceeded), late.error
    assert "wait" in late.error.message and "ran" in late.error.message


def test_request_timeout_of_the_cli(slow_daemon, tmp_path):
    require_sessions(slow_daemon)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "slow", "prompt": "x", "max_new_tokens": 200}) + "\n")
    run = cli("submit", str(src), "--request-timeout", "0.5", address=slow_daemon.address)
    assert run.returncode == 1
    [record] = [json.loads(x) for x in run.stdout.splitlines()]
    assert record["error"]["code"] == "timeout"


def test_a_strict_daemon_refuses_another_model_per_line(daemon_factory, tmp_path):
    try:
        daemon = daemon_factory("--engine", "synthetic", env={"EXGEN_STRICT_MODEL": "true"})
    except AssertionError as exc:
        if "strict_model" in str(exc) or "STRICT_MODEL" in str(exc):
            pytest.skip("the daemon has no strict_model setting yet")
        raise
    require_sessions(daemon)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    src = tmp_path / "in.jsonl"
    lines = [
        {
            "custom_id": "served",
            "url": "/v1/chat/completions",
            "body": {**chat, "model": "synthetic"},
        },
        {"custom_id": "other", "url": "/v1/chat/completions", "body": {**chat, "model": "gpt-4o"}},
        {"custom_id": "unnamed", "url": "/v1/chat/completions", "body": chat},
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = cli("submit", str(src), address=daemon.address)
    assert run.returncode == 1
    records = {r["custom_id"]: r for r in map(json.loads, run.stdout.splitlines())}
    assert records["served"]["response"]["status_code"] == 200
    assert records["unnamed"]["response"]["status_code"] == 200
    other = records["other"]["response"]
    assert other["status_code"] == 404 and other["body"]["error"]["code"] == "model_not_found"


def test_cancelling_another_keys_work_over_curve_is_a_one_line_refusal(daemon_factory, tmp_path):
    daemon, keys = start_curve_daemon(
        daemon_factory, tmp_path, "--engine", "synthetic", "--engine-opt", "token_ms=20",
        allowed=["alice", "bob"],
    )  # fmt: skip
    alice = [
        "--server-key",
        str(keys / "server.key"),
        "--client-key",
        str(keys / "alice.key_secret"),
    ]
    bob = ["--server-key", str(keys / "server.key"), "--client-key", str(keys / "bob.key_secret")]
    write_prompts(tmp_path / "big.jsonl", 300)
    out = tmp_path / "big-results.jsonl"
    submit = subprocess.Popen(
        [*EXGEN_CLIENT, "submit", str(tmp_path / "big.jsonl"), "-o", str(out), *alice,
         "--connect", daemon.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not out.exists() or len(out.read_text().splitlines()) < 5:
            assert submit.poll() is None, submit.communicate()
            time.sleep(0.05)
        refused = cli("cancel", "--all", *bob, address=daemon.address)
        assert refused.returncode == 1, refused.stderr
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith("exgen-client: not allowed: "), line
        assert submit.poll() is None, "bob cancelled alice's work"
        mine = cli("cancel", "--all", *alice, address=daemon.address)  # her other terminal
        assert mine.returncode == 0 and "big.jsonl" in mine.stdout, mine.stderr
    finally:
        submit.terminate()
        submit.communicate(timeout=30)
