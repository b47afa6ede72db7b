"""A vs B for the transformers engine in-process: two engine settings, rounds
alternating on one machine (shared machines drift; alternating keeps the ratio
honest). Each round runs the same prompts through one engine; per round: tokens/s
and CPU-ms per token (the process's CPU time, every thread); the medians and the
median of per-round ratios are printed as JSON.

    .venv/bin/python bench/hf_ab.py --a exact=true --b "" --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit, machine, seeds_prompts

from exgen.daemon.engines.base import Finished, Job, SamplingParams
from exgen.daemon.engines.hf import TransformersEngine


def parse_opts(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split() if pair)


def one_round(engine: TransformersEngine, prompts: list[str], tokens: int) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(Job(i, p, None, params))
    wall, cpu = time.perf_counter(), time.process_time()
    made = 0
    while engine.pending:
        for event in engine.step():
            if isinstance(event, Finished):
                made += event.completion_tokens
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"tokens_per_s": made / wall, "cpu_ms_per_token": 1000 * cpu / made}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", default="exact=true", help="engine options of A (k=v ...)")
    ap.add_argument("--b", default="", help="engine options of B")
    ap.add_argument("--common", default="threads=2", help="options of both")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    common = parse_opts(args.common)
    engines = {}
    for name in ("a", "b"):
        engines[name] = TransformersEngine(None, {**common, **parse_opts(getattr(args, name))})
        engines[name].load()
    seeds = [str(p["prompt"]) for p in seeds_prompts()]
    prompts = [seeds[i % len(seeds)] for i in range(args.prompts)]
    for engine in engines.values():
        one_round(engine, prompts[:2], 4)  # warm up
    rounds: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for name in order:
            rounds[name].append(one_round(engines[name], prompts, args.tokens))
    doc: dict[str, Any] = {"bench": "hf_ab", "args": vars(args), "machine": machine()}
    for name in ("a", "b"):
        for key in ("tokens_per_s", "cpu_ms_per_token"):
            doc[f"{name}_{key}"] = round(statistics.median(x[key] for x in rounds[name]), 2)
    pairs = list(zip(rounds["a"], rounds["b"], strict=True))
    speed = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs]
    cpu = [b["cpu_ms_per_token"] / a["cpu_ms_per_token"] for a, b in pairs]
    doc["speedup_b_over_a"] = round(statistics.median(speed), 3)
    doc["cpu_ratio_b_over_a"] = round(statistics.median(cpu), 3)
    doc["rounds"] = rounds
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
