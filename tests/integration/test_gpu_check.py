"""bench/gpu_check.py --dry-run: the prepared GPU run's plumbing, on this CPU machine.

The synthetic engine stands in for exllama and a tiny Llama runs on the transformers
engine; the real daemon, exgen-client, kill -9 and restart are exercised as on the
GPU, so the one command the lead launches when a GPU is lent is known to work.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
ROWS = "abcdefg"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "out"
    env = {**os.environ, "OUT": str(out)}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--workdir", str(tmp / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text()) if out.is_dir() else {}
    return {"proc": proc, "report": report, "out": out, "work": tmp / "work"}


def test_it_exits_zero_and_says_it_is_a_dry_run(dry_run: dict) -> None:
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "DRY RUN" in proc.stdout and "synthetic engine stands in" in proc.stdout
    assert dry_run["report"]["mode"] == "dry-run"


def test_every_step_ran_and_every_row_is_ok(dry_run: dict) -> None:
    report = dry_run["report"]
    assert report["install"]["status"] == "ok", report["install"]
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step)
    rows = {r["row"]: r for r in report["table"] if r["row"] != "-"}
    assert sorted(rows) == list(ROWS)
    assert all(r["status"] == "ok" for r in rows.values()), rows
    # The stand-in is named where an exllama number would be.
    assert "dry-run stand-in" in rows["a"]["result"]


def test_the_table_is_printed_last(dry_run: dict) -> None:
    tail = dry_run["proc"].stdout.strip().splitlines()[-40:]
    labels = [m.group(1) for line in tail if (m := re.match(r"([a-g])  (ok|failed) ", line))]
    assert labels == list(ROWS), tail
    assert (dry_run["out"] / "gpu_check.log").stat().st_size > 0


def test_after_kill_9_every_result_arrived_once(dry_run: dict) -> None:
    steps = dry_run["report"]["steps"]
    expected = dry_run["report"]["plan"]["prompts"]
    for name, engine in (("exl2", "synthetic"), ("hf", "transformers")):
        kill = steps[name]["kill"]
        assert kill["new_worker"]["restarts"] == 1, kill
        assert kill["new_worker"]["pid"] != steps[name]["daemon"]["worker"]["pid"]
        assert kill["answered_at_kill"] < expected, "the kill did not land mid-job"
        lines = (dry_run["work"] / f"results-{engine}-kill.jsonl").read_text().splitlines()
        results = [json.loads(line) for line in lines]
        assert len(results) == expected
        assert set(Counter(r["id"] for r in results).values()) == {1}
        assert all(r["error"] is None and r["text"] for r in results)


def test_the_comparisons_have_numbers(dry_run: dict) -> None:
    steps = dry_run["report"]["steps"]
    for name, key in (("exl2", "b"), ("hf", "f-exgen"), ("exl3", "e-exgen")):
        row = steps[name]["rows"][key]
        assert row["tokens_per_s"] > 0 and row["ratio"] > 0, row
        assert "not judged (dry run)" in row["goal"]


def test_two_slots_on_one_gpu_serve_the_workload_over_both(dry_run: dict, tmp_path: Path) -> None:
    """On the GPU, row c asks for --gpus "0;0": two slots sharing the one card; the
    workload runs over both (here on the CPU, the same path)."""
    plan = json.loads((dry_run["work"] / "plan.json").read_text())
    plan |= {"workdir": str(tmp_path), "engines": {**plan["engines"], "exl2": "transformers"}}
    (tmp_path / "steps").mkdir()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "bench/gpu_check.py", "--step", "two_slots",
           "--plan", str(tmp_path / "plan.json"), "--deadline", str(time.time() + 120)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150, check=True)
    doc = json.loads((tmp_path / "steps" / "two_slots.json").read_text())
    row = doc["rows"]["c"]
    assert row["status"] == "ok", doc
    assert len(row["per_slot"]) == 2, row


def test_kill_memory_verdicts() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_steps import KillMemory

    def memory(**kw: Any) -> KillMemory:  # the daemon took 4000 MiB
        return KillMemory(1000.0, 5000.0, **kw)

    freed = memory(before_kill=9000.0, lowest_after_kill=5400.0, after_restart=9100.0)
    assert freed.problem() is None and "4000 MiB" in freed.text()
    kept = memory(before_kill=9000.0, lowest_after_kill=8500.0, after_restart=9100.0)
    assert "only 500 of the worker's 4000 MiB" in (kept.problem() or "")
    doubled = memory(before_kill=9000.0, lowest_after_kill=5000.0, after_restart=13000.0)
    assert "more in use after the restart" in (doubled.problem() or "")
    listed = memory(victim_listed_after=True)
    assert "still listed" in (listed.problem() or "")
    per_process = memory(victim_mib=3000.0, before_kill=9000.0, lowest_after_kill=6500.0)
    assert per_process.problem() is None  # judged on what the pid held, not the daemon's total
    assert KillMemory(None, None).problem() is None and "n/a" in KillMemory(None, None).text()
