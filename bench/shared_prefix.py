"""Shared-prefix workload: the transformers engine's prefix cache on against off.

With ``--compare placement`` (and ``--workers 2``): the daemon's defaults (prefix
placement in the router, the engine's prefix cache) against both off (``placement =
"count"``, the balancing before, and ``prefix_cache_tokens=0``).

A job as evaluations and synthetic-data runs send them: a few long few-shot system
prompts (``--prefixes`` of about ``--shots`` question/answer pairs each, a few hundred
tokens after the chat template), many short questions after each, interleaved, greedy,
``--new-tokens`` each, on the demo model. Two daemons of one CPU worker each run side
by side in one process tree: one with the engine's defaults (prefix cache on), one
with ``prefix_cache_tokens=0``. Rounds alternate which goes first, and every round has
prefixes of its own, so no round finds what an earlier one cached. Reported: each
round's seconds and prompts/s for both, the per-round ratio and its median, and how
many texts the two daemons gave alike.

    .venv/bin/python bench/shared_prefix.py --rounds 3
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from benchlib import Daemon, emit, machine, median, running_daemon

SUBJECTS = ("plus", "minus", "times")


def few_shot(rng: random.Random, shots: int) -> str:
    """A system prompt of worked examples: the shared prefix."""
    lines = ["You are a careful calculator. Answer in the style of these examples."]
    for _ in range(shots):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice(SUBJECTS)
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        lines.append(f"Question: what is {a} {op} {b}? Answer: {a} {op} {b} is {value}.")
    return "\n".join(lines)


def question(rng: random.Random) -> str:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    text = f"what is {a} {rng.choice(SUBJECTS)} {b}?"
    if rng.random() < 0.3:  # some rows longer than others
        text += " Explain the steps briefly, then give the answer on its own line."
    return text


def workload(round_index: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(f"shared-prefix|{args.seed}|{round_index}")
    systems = [few_shot(rng, args.shots) for _ in range(args.prefixes)]
    items = [
        {"messages": [{"role": "system", "content": s}, {"role": "user", "content": question(rng)}]}
        for s in systems
        for _ in range(args.questions)
    ]
    rng.shuffle(items)  # a job's prefixes arrive interleaved
    return items


def timed(daemon: Daemon, items: list[dict[str, Any]], new_tokens: int) -> tuple[float, list[str]]:
    started = time.monotonic()
    with daemon.client(timeout=3600) as client:
        results = client.generate(items, max_new_tokens=new_tokens, temperature=0.0)
    elapsed = time.monotonic() - started
    failed = [r for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} items failed: {failed[0].error}")
    return elapsed, [r.text for r in results]


def run_rounds(on: Daemon, off: Daemon, args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = []
    for index in range(args.rounds):
        items = workload(index, args)
        order = [("on", on), ("off", off)] if index % 2 == 0 else [("off", off), ("on", on)]
        seconds: dict[str, float] = {}
        texts: dict[str, list[str]] = {}
        for name, daemon in order:
            seconds[name], texts[name] = timed(daemon, items, args.new_tokens)
        same = sum(a == b for a, b in zip(texts["on"], texts["off"], strict=True))
        row = {
            "round": index + 1,
            "items": len(items),
            "on_s": round(seconds["on"], 2),
            "off_s": round(seconds["off"], 2),
            "on_items_per_s": round(len(items) / seconds["on"], 3),
            "off_items_per_s": round(len(items) / seconds["off"], 3),
            "speedup": round(seconds["off"] / seconds["on"], 3),
            "same_text": same,
            "first": order[0][0],
        }
        print(row, flush=True)  # progress on stdout before the JSON document
        rounds.append(row)
    return rounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8, help="per prefix")
    parser.add_argument("--shots", type=int, default=16, help="examples per prefix")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="per worker")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--compare",
        choices=("cache", "placement"),
        default="cache",
        help="off = the cache off (cache), or the cache and prefix placement off (placement)",
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common = {"threads": args.threads, "dtype": args.dtype}
    off_env = {"EXGEN_PLACEMENT": "count"} if args.compare == "placement" else None
    with (
        running_daemon(args.workers, "transformers", common) as on,
        running_daemon(
            args.workers, "transformers", {**common, "prefix_cache_tokens": 0}, env=off_env
        ) as off,
    ):
        facts = on.status()
        rounds = run_rounds(on, off, args)
    doc = {
        "benchmark": "shared_prefix",
        "machine": machine(),
        "workload": {
            "prefixes": args.prefixes,
            "questions_per_prefix": args.questions,
            "shots": args.shots,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "dtype": args.dtype,
            "workers": args.workers,
            "compare": args.compare,
        },
        "workers": [
            {k: w.get(k) for k in ("engine", "capacity", "load_s")}
            for w in facts.get("workers", [])
        ],
        "rounds": rounds,
        "median_speedup": round(median([r["speedup"] for r in rounds]), 3),
        "median_on_s": round(median([r["on_s"] for r in rounds]), 2),
        "median_off_s": round(median([r["off_s"] for r in rounds]), 2),
    }
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
