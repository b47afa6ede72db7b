"""Stopping a batch as its user meets it, with real
processes: `exgen-client submit` killed by a signal, or out of disk, cancels its work
at the daemon, and `--resume` completes the file; OpenAI lines come back in shapes the
`openai` SDK's own models accept, naming the served model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXGEN_CLIENT, submit_batch

pytestmark = pytest.mark.timeout(180)


def write_prompts(path: Path, n: int, tokens: int = 20) -> list[str]:
    ids = [f"q{i:04d}" for i in range(n)]
    with path.open("w") as fh:
        for i, item_id in enumerate(ids):
            fh.write(
                json.dumps({"id": item_id, "prompt": f"question {i}", "max_new_tokens": tokens})
            )
            fh.write("\n")
    return ids


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def status_json(address: str) -> dict[str, Any]:
    out = subprocess.run(
        [*EXGEN_CLIENT, "status", "--json", "--connect", address],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[str]) -> None:
    while not path.exists() or len(path.read_text().splitlines()) < n:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)


def drained_within(address: str, seconds: float) -> float:
    """Seconds until the daemon holds nothing queued or in flight (fails past ``seconds``)."""
    started = time.monotonic()
    while True:
        status = status_json(address)
        if status["queued"] == 0 and status["inflight"] == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, f"work left running for nobody: {status}"
        time.sleep(0.1)


def as_from_a_terminal() -> None:
    """In the client's process before exec: the signals a terminal's user sends at
    their default, whatever this test run inherited (a background job ignores SIGINT,
    ``nohup`` SIGHUP: then Python installs no KeyboardInterrupt, and the client keeps
    an ignored SIGHUP ignored)."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def nohup() -> None:
    as_from_a_terminal()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.fixture
def slow_daemon(daemon_factory):
    # 2 workers x 8 sequences x 20 tokens x 20 ms: 1,000 prompts would take ~25 s.
    return daemon_factory("--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=20")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signalled_submit_cancels_its_work_and_resume_completes_the_file(
    slow_daemon, tmp_path, signum
):
    ids = write_prompts(tmp_path / "prompts.jsonl", 1000)
    out = tmp_path / "results.jsonl"
    command = [*EXGEN_CLIENT, "submit", str(tmp_path / "prompts.jsonl"), "-o", str(out)]
    proc = subprocess.Popen(
        [*command, "--connect", slow_daemon.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=as_from_a_terminal,
    )  # fmt: skip
    wait_for_lines(out, 20, proc)
    before = status_json(slow_daemon.address)
    assert before["queued"] + before["inflight"] > 100, before
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, stderr
    assert "cancelled" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert drained_within(slow_daemon.address, 3.0) < 3.0
    resumed = subprocess.run(
        [*command, "--resume", "--connect", slow_daemon.address],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert Counter(r["id"] for r in read_results(out)) == Counter(ids), "lost or duplicated ids"


def test_a_submit_under_nohup_outlives_a_hangup(slow_daemon, tmp_path):
    ids = write_prompts(tmp_path / "prompts.jsonl", 200)
    out = tmp_path / "results.jsonl"
    proc = subprocess.Popen(
        [*EXGEN_CLIENT, "submit", str(tmp_path / "prompts.jsonl"), "-o", str(out),
         "--connect", slow_daemon.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=nohup,
    )  # fmt: skip
    wait_for_lines(out, 20, proc)
    proc.send_signal(signal.SIGHUP)  # the terminal closed
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert Counter(r["id"] for r in read_results(out)) == Counter(ids), "lost or duplicated ids"


def tmpfs(directory: Path, size: str) -> bool:
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True, text=True,
    )  # fmt: skip
    return mounted.returncode == 0


def test_a_full_disk_stops_cleanly_cancels_and_resume_elsewhere_completes(slow_daemon, tmp_path):
    small = tmp_path / "small"
    if not tmpfs(small, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        ids = write_prompts(tmp_path / "prompts.jsonl", 1000)
        out = small / "results.jsonl"
        run = subprocess.run(
            [*EXGEN_CLIENT, "submit", str(tmp_path / "prompts.jsonl"), "-o", str(out),
             "--connect", slow_daemon.address],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 4, run.stderr
        [line] = [x for x in run.stderr.splitlines() if x.startswith("exgen-client:")]
        assert "No space left on device" in line and "--resume" in line
        assert "Traceback" not in run.stderr
        assert drained_within(slow_daemon.address, 3.0) < 3.0
        roomy = tmp_path / "results.jsonl"
        shutil.copyfile(out, roomy)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    done_before = len(read_results_tolerant(roomy))
    assert 0 < done_before < 1000
    resumed = subprocess.run(
        [*EXGEN_CLIENT, "submit", str(tmp_path / "prompts.jsonl"), "-o", str(roomy), "--resume",
         "--connect", slow_daemon.address],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert Counter(r["id"] for r in read_results(roomy)) == Counter(ids), "lost or duplicated ids"


def read_results_tolerant(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a file a full disk cut off (its last line may be half)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_a_closed_pipe_stops_the_submit_and_cancels_its_work(slow_daemon, tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", 1000)
    command = [*EXGEN_CLIENT, "submit", str(tmp_path / "prompts.jsonl")]
    submit = subprocess.Popen(
        [*command, "--connect", slow_daemon.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert submit.stdout is not None
    for _ in range(5):
        submit.stdout.readline()
    submit.stdout.close()  # as `| head -5` does
    assert submit.stderr is not None
    with submit.stderr:
        stderr = submit.stderr.read().decode()
    assert submit.wait(30) == 128 + signal.SIGPIPE, stderr
    assert "Traceback" not in stderr
    assert drained_within(slow_daemon.address, 3.0) < 3.0


VLLM_STYLE_BATCH = [
    # vLLM's examples/offline_inference/openai_batch/openai_example_batch.jsonl, line for line:
    # chat lines naming a model this daemon does not serve.
    {
        "custom_id": f"request-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "meta-llama/Meta-Llama-3-8B-Instruct",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "Hello world!"},
            ],
            "max_completion_tokens": 1000,
        },
    }
    for i, system in enumerate(
        ("You are a helpful assistant.", "You are an unhelpful assistant."), 1
    )
]


def test_openai_output_validates_with_the_sdk_and_names_the_served_model(daemon_factory, tmp_path):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    daemon = daemon_factory("--engine", "synthetic", "--workers", "1")
    completions = {
        "custom_id": "request-3",
        "method": "POST",
        "url": "/v1/completions",
        "body": {
            "model": "gpt-3.5-turbo-instruct",
            "prompt": "Say this is a test",
            "max_tokens": 7,
        },
    }
    results = submit_batch(daemon.address, [*VLLM_STYLE_BATCH, completions], tmp_path)
    served = status_json(daemon.address)["model"]
    records = {r["custom_id"]: r for r in results}
    assert set(records) == {"request-1", "request-2", "request-3"}
    for custom_id, record in records.items():
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        model = Completion if custom_id == "request-3" else ChatCompletion
        parsed = model.model_validate(body)
        assert parsed.model == served == "synthetic", "the model that wrote the text"
        assert parsed.usage is not None and parsed.usage.completion_tokens > 0
