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
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
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


# --- prebuilt extensions (make gpu-prebuilt) and the JIT fallback --------------------------


def gpu_check_module() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    return gpu_check


def make_wheel(directory: Path, dist: str, module_source: str, tag: str = "py3-none-any") -> Path:
    """A wheel holding one top-level module, ``<dist>.py``, as make gpu-prebuilt's hold
    ``<dist>.cpython-312-…so``."""
    import zipfile

    name = f"{dist}-0.0.1-{tag}.whl"
    info = f"{dist}-0.0.1.dist-info"
    with zipfile.ZipFile(directory / name, "w") as zf:
        zf.writestr(f"{dist}.py", module_source)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        zf.writestr(f"{info}/RECORD", "")
    return directory / name


@pytest.fixture
def prebuilt_env(tmp_path: Path) -> Iterator[tuple[Any, Path, list[str], Any]]:
    gc = gpu_check_module()
    site = tmp_path / "site"
    site.mkdir()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-cache-dir", "--upgrade", "--target", str(site)]  # fmt: skip
    log = gc.Log(tmp_path / "log.txt", verbose=False)
    yield gc, site, pip, log
    log.file.close()


def test_the_prebuilt_wheels_are_told_from_the_libraries(tmp_path: Path) -> None:
    gc = gpu_check_module()
    names = ["exllamav2-0.3.2-py3-none-any.whl", "exllamav3-1.6.5-py3-none-any.whl",
             "exllamav2_ext-0.3.2+torch2.11.0.cu130.sm90-cp312-cp312-linux_x86_64.whl",
             "exllamav3_ext-1.6.5+torch2.11.0.cu130.sm90-cp312-cp312-linux_x86_64.whl",
             "pyzmq-27.3.0-cp312-cp312-manylinux_2_28_x86_64.whl"]  # fmt: skip
    found = gc.prebuilt_wheels([tmp_path / n for n in names])
    assert {k: v.name for k, v in found.items()} == {
        "exllamav2": names[2], "exllamav3": names[3]
    }


def test_a_prebuilt_module_that_imports_is_used(prebuilt_env: tuple) -> None:
    gc, site, pip, log = prebuilt_env
    wheel = make_wheel(site.parent, "exllamav2_ext", "def gemm_half_q_half(): pass\n")
    pre = gc.use_prebuilt("exllamav2", wheel, site, pip, log)
    assert pre.used and pre.wheel == wheel.name, pre
    build = gc.Build("exllamav2", gc.asdict(pre))
    assert build.ok and build.done  # no JIT build started, none awaited
    row = gc._build_row("exllamav2", gc.build_doc(None, build))
    assert row["status"] == "ok" and f"prebuilt {wheel.name}" in row["result"], row


def test_a_prebuilt_module_that_does_not_import_falls_back_to_the_jit_build(
    prebuilt_env: tuple,
) -> None:
    """As a module built against another torch fails: removed again, so the library's
    own loader JIT-builds instead, and the table says why."""
    gc, site, pip, log = prebuilt_env
    error = "undefined symbol: _ZN3c104cuda20CUDACachingAllocator9allocatorE"
    wheel = make_wheel(site.parent, "exllamav3_ext", f"raise ImportError({error!r})\n")
    pre = gc.use_prebuilt("exllamav3", wheel, site, pip, log)
    assert not pre.used and error in pre.reason, pre
    assert not list(site.glob("exllamav3_ext*")), "the broken module was left for the library"
    build = gc.Build("exllamav3", gc.asdict(pre), started=100.0, ended=400.0, code=0)
    row = gc._build_row("exllamav3", gc.build_doc(None, build))
    assert row["status"] == "ok" and row["result"].startswith("JIT-built in 300.0s"), row
    assert f"prebuilt {wheel.name} not used: does not import: ImportError: {error}" in row["result"]


def test_a_wheel_pip_refuses_and_a_missing_one_fall_back_too(prebuilt_env: tuple) -> None:
    gc, site, pip, log = prebuilt_env
    wheel = make_wheel(site.parent, "exllamav2_ext", "", tag="cp27-cp27mu-win32")
    refused = gc.use_prebuilt("exllamav2", wheel, site, pip, log)
    assert not refused.used and "pip did not install it" in refused.reason, refused
    missing = gc.use_prebuilt("exllamav2", None, site, pip, log)
    assert not missing.used and "make gpu-prebuilt" in missing.reason
    build = gc.Build("exllamav2", gc.asdict(missing), started=1.0, ended=9.0, code=1)
    build.log_path = site.parent / "build.log"
    build.log_path.write_text("nvcc fatal   : Unsupported gpu architecture 'compute_200'\n")
    row = gc._build_row("exllamav2", gc.build_doc(SimpleNamespace(dry_run=False), build))
    assert row["status"] == "failed" and "Unsupported gpu architecture" in row["result"], row
    assert "not used: no prebuilt wheel" in row["result"]


def test_measured_steps_pause_a_running_jit_build() -> None:
    """No compile beside a measured row: SIGSTOP for the step, SIGCONT after, the
    compilers too, which ninja starts in process groups of their own."""
    gc = gpu_check_module()
    assert [s.name for s in gc.STEPS if not s.measured] == ["model"]
    ninja = ("import subprocess, sys; c = subprocess.Popen(['sleep', '60'], process_group=0); "
             "print(c.pid, flush=True); c.wait()")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", ninja], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    compiler = int(proc.stdout.readline())
    try:
        assert os.getpgid(compiler) != os.getpgid(proc.pid)
        builds = {"exllamav3": gc.Build("exllamav3", proc=proc, started=time.monotonic())}
        assert gc.signal_builds(builds, gc.signal.SIGSTOP) == ["exllamav3"]
        assert reaches_state(proc.pid, "T") and reaches_state(compiler, "T")
        gc.signal_builds(builds, gc.signal.SIGCONT)
        assert reaches_state(proc.pid, "S") and reaches_state(compiler, "S")
    finally:
        os.kill(compiler, gc.signal.SIGKILL)
        proc.kill()
        proc.wait()
        proc.stdout.close()


def reaches_state(pid: int, want: str) -> bool:
    """Whether the process is in this state (/proc's T: stopped, S: sleeping) within 5 s."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == want:
            return True
        time.sleep(0.05)
    return False
