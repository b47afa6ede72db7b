"""Batch submission as the user runs it: `exgen-client submit` against a real
daemon, a 1,000-line file, with and without a worker killed by `kill -9` mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import EXGEN_CLIENT

pytestmark = pytest.mark.timeout(180)


def write_prompts(path: Path, n: int) -> list[str]:
    ids = [f"q{i:04d}" for i in range(n)]
    with path.open("w") as fh:
        for i, item_id in enumerate(ids):
            fh.write(
                json.dumps({"id": item_id, "prompt": f"question {i}", "max_new_tokens": 12}) + "\n"
            )
    return ids


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def client(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXGEN_CLIENT, *args, "--connect", address], capture_output=True, text=True, timeout=120
    )


def test_submit_thousand_lines_every_id_once(daemon_factory, tmp_path):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "4", "--engine-opt", "token_ms=1")
    ids = write_prompts(tmp_path / "prompts.jsonl", 1000)
    out = tmp_path / "results.jsonl"
    run = client("submit", str(tmp_path / "prompts.jsonl"), "-o", str(out), address=daemon.address)
    assert run.returncode == 0, run.stderr
    results = read_results(out)
    assert Counter(r["id"] for r in results) == Counter(ids)
    assert all(r["error"] is None and r["completion_tokens"] == 12 and r["text"] for r in results)


def test_submit_survives_kill_9_of_a_worker_from_status_json(daemon_factory, tmp_path):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "4", "--engine-opt", "token_ms=4")
    ids = write_prompts(tmp_path / "prompts.jsonl", 1000)
    out = tmp_path / "results.jsonl"
    command = [*EXGEN_CLIENT, "submit", str(tmp_path / "prompts.jsonl"), "-o", str(out)]
    submit = subprocess.Popen(
        [*command, "--connect", daemon.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not out.exists() or len(out.read_text().splitlines()) < 200:
        assert submit.poll() is None, submit.communicate()
        time.sleep(0.05)
    status = json.loads(client("status", "--json", address=daemon.address).stdout)
    victim = status["workers"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    _, stderr = submit.communicate(timeout=120)
    assert submit.returncode == 0, stderr
    results = read_results(out)
    assert Counter(r["id"] for r in results) == Counter(ids), "lost or duplicated ids"
    assert all(r["error"] is None for r in results)
    after = daemon.wait_ready()
    slot = next(w for w in after["workers"] if w["slot"] == victim["slot"])
    assert slot["restarts"] >= 1 and slot["pid"] != victim["pid"]
    assert all(w["state"] == "ready" for w in after["workers"])
