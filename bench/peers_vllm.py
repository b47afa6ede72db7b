"""vLLM's offline API (``vllm.LLM``) on the seeds' workload; run by bench/peers.py with
the Python of its own virtualenv (vLLM's CPU build), never with exgen's.

Prints one JSON line: load and generation seconds, tokens, CPU seconds of this
process and its children during generation, peak RSS, and the texts by id.

    bench/out/peers/vllm-venv/bin/python bench/peers_vllm.py MODEL_DIR PROMPTS.jsonl bfloat16
    ... bfloat16 prefix-caching    # automatic prefix caching on, whatever the default

Every prompt's ``max_new_tokens`` is its own (a list of SamplingParams).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil


def tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def peak_rss(procs: list[psutil.Process]) -> int:
    """Sum of each process's high-water RSS (VmHWM), bytes."""
    total = 0
    for proc in procs:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def main() -> None:
    model, prompts_file, dtype = sys.argv[1:4]
    caching = sys.argv[4:5] == ["prefix-caching"]
    from vllm import LLM, SamplingParams

    items = [json.loads(line) for line in Path(prompts_file).read_text().splitlines()]
    started = time.perf_counter()
    extra = {"enable_prefix_caching": True} if caching else {}
    llm = LLM(model=model, dtype=dtype, seed=0, **extra)
    load_s = time.perf_counter() - started
    params = [SamplingParams(temperature=0.0, max_tokens=it["max_new_tokens"]) for it in items]
    procs = tree()
    cpu_before = cpu_seconds(procs)
    started = time.perf_counter()
    outputs = llm.generate([it["prompt"] for it in items], params, use_tqdm=False)
    generate_s = time.perf_counter() - started
    cpu = cpu_seconds(procs) - cpu_before
    doc = {
        "load_s": load_s,
        "seconds": generate_s,
        "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "cpu_s": cpu,
        "peak_rss": peak_rss(procs),
        "texts": {it["id"]: o.outputs[0].text for it, o in zip(items, outputs, strict=True)},
    }
    print("PEERS_JSON " + json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
