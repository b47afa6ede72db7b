"""Tokens/s of exgen on the GPUs of this machine: one worker per GPU (or GPU group).

Starts ``exgen serve`` with an exllama engine, runs the seeds' workload through it
(examples/prompts.jsonl: the ten seed prompts × 10, 100 new tokens each; ``--scale``
repeats it) and reports tokens/s per slot (GPU) and in total, the median of
``--repeat`` runs. Model load time is reported on its own.

    .venv/bin/python bench/bench_gpu.py --model models/Llama-3.1-8B-Instruct-exl2-4.0bpw \\
        --gpus 0,1,2,3 --repeat 3 --scale 10

Where CUDA, the engine's library or a model directory is missing, it prints why it
is skipped and exits 0 (so it can sit in a benchmark suite that also runs on CPUs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = ROOT / "examples" / "prompts.jsonl"
READY_TIMEOUT_S = 1800  # a first import of exllamav2 may compile its extension


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=os.environ.get("EXGEN_GPU_MODEL"),
        help="model directory (default: $EXGEN_GPU_MODEL)",
    )
    parser.add_argument("--engine", default="auto", choices=["auto", "exllamav2", "exllamav3"])
    parser.add_argument("--gpus", help="slots, as for exgen serve (default: one per visible GPU)")
    parser.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--scale", type=int, default=1, help="repeat the workload this many times")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the report here")
    return parser.parse_args(argv)


# --- why not here ----------------------------------------------------------------------------


def skip_reason(args: argparse.Namespace) -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not args.model:
        return "no model directory (--model or EXGEN_GPU_MODEL)"
    if not Path(args.model).is_dir():
        return f"{args.model} is not a directory"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "no CUDA device visible"
    engine = resolve_engine(args)
    if engine is None:
        return f"cannot choose an engine for {args.model} (exgen models inspect says why)"
    # find_spec only: importing exllamav2 here would compile it in this process too.
    if importlib.util.find_spec(engine) is None:
        return f"{engine} is not installed (see docs/gpus.md)"
    return None


def resolve_engine(args: argparse.Namespace) -> str | None:
    if args.engine != "auto":
        return str(args.engine)
    from exgen.daemon.engines.base import EngineUnavailable
    from exgen.daemon.modelprobe import choose_engine

    try:
        engine = choose_engine(args.model)
    except EngineUnavailable as exc:
        logger.info("%s", exc)
        return None
    return engine if engine in ("exllamav2", "exllamav3") else None


def default_gpus() -> str:
    import torch

    return ",".join(str(i) for i in range(torch.cuda.device_count()))


# --- workload ----------------------------------------------------------------------------------


def load_workload(path: Path, scale: int) -> list[dict[str, Any]]:
    """Prompt items from a prompts.jsonl (prompt or messages per line), ``scale`` times."""
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        item = {k: row[k] for k in ("prompt", "messages") if k in row}
        items.append(item)
    return [dict(item, id=f"{n}-{i}") for n in range(scale) for i, item in enumerate(items)]


# --- the daemon --------------------------------------------------------------------------------


def start_daemon(
    args: argparse.Namespace, engine: str, gpus: str, address: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "exgen.daemon.cli",
        "serve",
        "--engine",
        engine,
        "--model",
        str(args.model),
        "--gpus",
        gpus,
        "--listen",
        address,
    ]
    for opt in args.engine_opt:
        cmd += ["--engine-opt", opt]
    logger.info("starting: %s", " ".join(cmd))
    return subprocess.Popen(cmd, cwd=ROOT)


def wait_ready(client: Any, daemon: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The status document once every slot is ready; SystemExit on a boot failure."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"exgen serve exited with {daemon.returncode} before it was ready")
        try:
            status = client.status()
        except Exception:  # not listening yet: the client raises its timeout error
            time.sleep(1.0)
            continue
        workers = status.get("workers") or []
        failed = [w for w in workers if w.get("boot_error") or w.get("state") == "failed"]
        if failed:
            raise SystemExit(f"worker failed to start: {failed[0].get('boot_error') or failed[0]}")
        if workers and all(w.get("state") == "ready" for w in workers):
            return dict(status)
        time.sleep(1.0)
    raise SystemExit(f"workers not ready after {READY_TIMEOUT_S} s")


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


# --- measuring ---------------------------------------------------------------------------------


def run_once(client: Any, items: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    results = client.generate(items, max_new_tokens=max_new_tokens)
    wall = time.perf_counter() - start
    per_slot: dict[int, int] = defaultdict(int)
    for r in results:
        if r.ok and r.slot is not None:
            per_slot[r.slot] += r.completion_tokens
    total = sum(per_slot.values())
    return {
        "wall_s": wall,
        "errors": sum(1 for r in results if not r.ok),
        "tokens": total,
        "tokens_per_s": total / wall,
        "slot_tokens_per_s": {slot: n / wall for slot, n in sorted(per_slot.items())},
    }


def summarise(runs: list[dict[str, Any]], status: dict[str, Any], load_s: float) -> dict[str, Any]:
    slots = sorted({s for run in runs for s in run["slot_tokens_per_s"]})
    devices = {w["slot"]: w.get("devices") for w in status.get("workers", [])}
    return {
        "engine": status.get("engine"),
        "model": status.get("model"),
        "runs": len(runs),
        "load_s": round(load_s, 1),
        "total_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
        "per_slot": [
            {
                "slot": s,
                "devices": devices.get(s),
                "tokens_per_s": round(
                    statistics.median(r["slot_tokens_per_s"].get(s, 0.0) for r in runs), 1
                ),
            }
            for s in slots
        ],
        "wall_s": [round(r["wall_s"], 2) for r in runs],
        "errors": sum(r["errors"] for r in runs),
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"engine {report['engine']}, model {report['model']}, "
        f"load {report['load_s']} s, median of {report['runs']} runs"
    )
    for row in report["per_slot"]:
        devices = row["devices"]
        gpus = ",".join(map(str, devices)) if isinstance(devices, list) else devices
        print(f"  slot {row['slot']} (GPU {gpus}): {row['tokens_per_s']:.1f} tokens/s")
    print(f"  total: {report['total_tokens_per_s']:.1f} tokens/s; errors: {report['errors']}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    reason = skip_reason(args)
    if reason:
        print(f"bench_gpu: skipped: {reason}")
        return 0
    from exgen.client import Client

    engine = resolve_engine(args) or args.engine
    items = load_workload(args.prompts, args.scale)
    with tempfile.TemporaryDirectory(prefix="exgen-bench-") as tmp:
        address = f"ipc://{tmp}/exgen.sock"
        started = time.monotonic()
        daemon = start_daemon(args, engine, args.gpus or default_gpus(), address)
        try:
            with Client(address, timeout=5.0) as probe:
                status = wait_ready(probe, daemon)
            load_s = time.monotonic() - started
            with Client(address, timeout=None) as client:
                client.generate(items[:4], max_new_tokens=8)  # warm-up, not timed
                runs = [run_once(client, items, args.max_new_tokens) for _ in range(args.repeat)]
        finally:
            stop_daemon(daemon)
    report = summarise(runs, status, load_s)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
