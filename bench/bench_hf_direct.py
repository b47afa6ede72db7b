"""Tokens/s of the transformers engine driven in-process (no daemon, no sockets).

The baseline the daemon is compared against: the same engine and workload, minus
the router and the worker. Prints one JSON document.

    .venv/bin/python bench/bench_hf_direct.py --repeat 3 --max-new-tokens 100 --batch-size 8 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from typing import Any

from exgen.daemon.engines.base import Finished, Job, SamplingParams
from exgen.daemon.engines.hf import TransformersEngine

logger = logging.getLogger(__name__)

# The seeds' workload: short chat prompts asking for short creative texts.
TOPICS = [
    "the best first lines in books",
    "the best last lines in books",
    "the most memorable opening lines of films",
    "famous first sentences of speeches",
    "the best first lines of poems",
    "opening lines of classic fairy tales",
    "the best first lines of songs",
    "memorable first lines of science fiction novels",
    "the best opening lines of detective stories",
    "first lines of famous letters",
]

Prompt = str | list[dict[str, str]]


def seed_prompts(repeat: int) -> list[Prompt]:
    """The ten seed prompts as chat messages, ``repeat`` times over."""
    chats: list[Prompt] = [[{"role": "user", "content": f"List {topic}."}] for topic in TOPICS]
    return chats * repeat


def run_direct(
    prompts: list[Prompt],
    max_new_tokens: int,
    batch_size: int,
    *,
    model: str | None = None,
    threads: int = 0,
    engine: TransformersEngine | None = None,
) -> dict[str, Any]:
    """Greedy generation for every prompt through one engine; timings and token counts.

    Pass ``engine`` to reuse a loaded one (its batch size is then set here).
    """
    load_s = 0.0
    if engine is None:
        options = {"batch_size": str(batch_size), "threads": str(threads)}
        engine = TransformersEngine(model, options)
        engine.load()
        load_s = engine.load_s
    engine._batch_limit = batch_size  # the bench varies it on one loaded model
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for key, prompt in enumerate(prompts):
        is_chat = not isinstance(prompt, str)
        engine.add(Job(key, None if is_chat else prompt, prompt if is_chat else None, params))
    started = time.monotonic()
    finished: list[Finished] = []
    while engine.pending:
        finished.extend(e for e in engine.step() if isinstance(e, Finished))
    elapsed = time.monotonic() - started
    completion = sum(f.completion_tokens for f in finished)
    return {
        "engine": engine.describe(),
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "load_s": round(load_s, 2),
        "generate_s": round(elapsed, 2),
        "prompt_tokens": sum(f.prompt_tokens for f in finished),
        "completion_tokens": completion,
        "tokens_per_s": round(completion / elapsed, 1),
        "prompts_per_s": round(len(finished) / elapsed, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: demo)")
    parser.add_argument("--repeat", type=int, default=3, help="times over the 10 prompts")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prompts = seed_prompts(args.repeat)
    engine = TransformersEngine(args.model, {"threads": str(args.threads)})
    engine.load()
    runs = []
    for batch_size in args.batch_size:
        result = run_direct(prompts, args.max_new_tokens, batch_size, engine=engine)
        result["load_s"] = round(engine.load_s, 2)
        logger.info("batch %d: %.1f tokens/s", batch_size, result["tokens_per_s"])
        runs.append(result)
    # Other work on the box skews tokens/s: the load average says how much there was.
    host = {"node": platform.node(), "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}
    print(json.dumps({"host": host, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
