"""The seeds' method, re-implemented: Accelerate data parallel, static split, CPU.

Each of N processes loads the model, takes its contiguous share of the prompts
with ``PartialState().split_between_processes``, generates in left-padded batches
of 16 (greedy, 100 new tokens), and the results come together with
``gather_object``. Tokens/s counts generation only; model load is timed apart.

Launching N processes on a CPU: with accelerate 1.15 and no MPI,
``accelerate launch --cpu --num_processes 2`` starts ONE process (the simple
launcher; multi-CPU needs ``--mpirun_hostfile``) — checked: it reports rank 0 of 1.
So N > 1 is launched with accelerate's torchrun launcher (``--multi_gpu
--num_processes N``) and the script asks for ``PartialState(cpu=True)``: N
processes over gloo, the seeds' multi-process run on CPU. N = 1 uses ``--cpu``.

Tokens are counted as exgen counts them: generated tokens up to and including the
first EOS (the seeds counted the pad tokens after EOS too, which flatters them).

    .venv/bin/python bench/seeds_accelerate.py --processes 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
BATCH = 16


# --- the script each process runs (under accelerate launch) ----------------------


def _load(state: Any) -> tuple[Any, Any, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exgen.daemon import modelstore

    started = time.perf_counter()
    path = modelstore.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).to(state.device)
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only: pad on the left for batched generate
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model, time.perf_counter() - started


def _count(row: list[int], eos: set[int], limit: int) -> int:
    for i, token in enumerate(row[:limit]):
        if token in eos:
            return i + 1
    return min(len(row), limit)


def _generate(tokenizer: Any, model: Any, prompts: list[str], max_new: int) -> list[int]:
    import torch

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    counts: list[int] = []
    for start in range(0, len(prompts), BATCH):
        batch = tokenizer(prompts[start : start + BATCH], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        width = batch["input_ids"].shape[1]
        counts.extend(_count(row, eos_ids, max_new) for row in out[:, width:].tolist())
    return counts


def process_main(prompts_file: str, max_new: int, out_file: str) -> None:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=True)
    tokenizer, model, load_s = _load(state)
    prompts = [json.loads(line)["prompt"] for line in Path(prompts_file).read_text().splitlines()]
    state.wait_for_everyone()
    started = time.perf_counter()
    cpu_started = time.process_time()
    with state.split_between_processes(prompts) as mine:
        counts = _generate(tokenizer, model, list(mine), max_new)
    mine_out = {
        "tokens": sum(counts),
        "prompts": len(counts),
        "load_s": load_s,
        "cpu_s": time.process_time() - cpu_started,
    }
    gathered = gather_object([mine_out])
    elapsed = time.perf_counter() - started
    if state.is_main_process:
        doc = {
            "processes": state.num_processes,
            "prompts": sum(g["prompts"] for g in gathered),
            "completion_tokens": sum(g["tokens"] for g in gathered),
            "generate_s": elapsed,
            "load_s": max(g["load_s"] for g in gathered),
            "cpu_s": sum(g["cpu_s"] for g in gathered),
        }
        Path(out_file).write_text(json.dumps(doc))


# --- the launcher ------------------------------------------------------------------


def launch_command(processes: int, threads: int) -> list[str]:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    common = [
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads),
    ]  # fmt: skip
    mode = ["--cpu"] if processes == 1 else ["--multi_gpu"]
    return [accelerate, "launch", *mode, *common]


def run(
    prompts: list[dict[str, Any]], processes: int, threads: int, max_new: int
) -> dict[str, Any]:
    """One `accelerate launch` of the seeds' script; its numbers and the launch's wall time."""
    with tempfile.TemporaryDirectory(prefix="exgen-seeds-") as tmp:
        prompts_file = Path(tmp) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        out = Path(tmp) / "out.json"
        cmd = [
            *launch_command(processes, threads), str(HERE), "--process",
            "--prompts-file", str(prompts_file), "--max-new-tokens", str(max_new),
            "--out", str(out),
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr[-3000:]
            raise RuntimeError(f"accelerate launch failed ({proc.returncode}):\n{tail}")
        doc: dict[str, Any] = json.loads(out.read_text())
    doc["tokens_per_s"] = doc["completion_tokens"] / doc["generate_s"]
    doc["launch_wall_s"] = wall
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", default=str(HERE.parents[1] / "examples/prompts.jsonl"))
    parser.add_argument("--out", default="")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="per process (0: cores ÷ N)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    args = parser.parse_args()
    if args.process:
        process_main(args.prompts_file, args.max_new_tokens, args.out)
        return
    prompts = [json.loads(line) for line in Path(args.prompts_file).read_text().splitlines()]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)
    print(json.dumps(run(prompts, args.processes, threads, args.max_new_tokens), indent=2))


if __name__ == "__main__":
    main()
