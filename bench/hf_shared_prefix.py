"""The transformers engine alone on one worker's share of bench/shared_prefix.py's job:
where a round of prefix placement + cache spends its time, without the daemon.

``--prefixes`` few-shot system prompts (``--shots`` worked examples each) × ``--questions``
short questions each, all added at once to one in-process engine (one thread by
default, as each of 2 CPU workers runs), greedy, ``--new-tokens`` each; the engine's
defaults otherwise (its prefix cache on). More prompts than the batch holds, so rows
join the running batch as others end. Each round has prefixes of its own (the cache
never holds a round's prefixes at its start). Prints wall and CPU seconds per round
and their medians, as one JSON document (bench/compare.py reads it).

    .venv/bin/python bench/hf_shared_prefix.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shared_prefix
from benchlib import emit, machine

from exgen.daemon.engines.base import Finished, Job, SamplingParams
from exgen.daemon.engines.hf import TransformersEngine


def one_round(engine: TransformersEngine, items: list[dict[str, Any]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens)
    for key, item in enumerate(items):
        engine.add(Job(key, None, item["messages"], params))
    wall, cpu = time.perf_counter(), time.process_time()
    done = 0
    while engine.pending:
        done += sum(isinstance(e, Finished) for e in engine.step())
    if done != len(items):
        raise RuntimeError(f"{done} of {len(items)} finished")
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefixes", type=int, default=4, help="one worker's share of 8")
    parser.add_argument("--questions", type=int, default=24, help="per prefix")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--engine-opt", action="append", default=[], metavar="KEY=VALUE",
        help="an engine option (repeatable), as `exgen serve --engine-opt`",
    )  # fmt: skip
    args = parser.parse_args(argv)
    options = dict(opt.split("=", 1) for opt in args.engine_opt)
    engine = TransformersEngine(None, {"threads": str(args.threads), **options})
    engine.load()
    job = shared_prefix.parse_args(
        ["--prefixes", str(args.prefixes), "--questions", str(args.questions),
         "--shots", str(args.shots)]
    )  # fmt: skip
    one_round(engine, shared_prefix.workload(1000, job)[:4], 2)  # warm up, prefixes of its own
    rounds = [
        one_round(engine, shared_prefix.workload(r, job), args.new_tokens)
        for r in range(args.rounds)
    ]
    doc: dict[str, Any] = {"bench": "hf_shared_prefix", "args": vars(args), "machine": machine()}
    doc["wall_s"] = round(statistics.median(r["wall_s"] for r in rounds), 2)
    doc["cpu_s"] = round(statistics.median(r["cpu_s"] for r in rounds), 2)
    doc["rounds"] = [{k: round(v, 2) for k, v in r.items()} for r in rounds]
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
