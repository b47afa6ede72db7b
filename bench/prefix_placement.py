"""Prefix placement at scale: synthetic workers that model prefill and a prefix cache.

A job as evaluations send them: ``--prefixes`` few-shot blocks of ``--prefix-words``
words (a word is a token to the synthetic engine; a whole number of its 16-word cache
blocks), each followed by many short questions of their own, interleaved; a fixed
``--new-tokens`` each (``ignore_eos``). Each synthetic worker (a simulated GPU, paced)
steps ``token_ms + batch_ms × active`` ms, plus ``prefill_token_ms`` per prompt token
it does not find in its prefix cache.

Reported, for the daemon's default placement ("prefix") and for count balancing
("count", the placement before), at each number of workers:

- **prefill**: prompt tokens the workers prefilled (their heartbeats' counters), over
  the **minimum**: every item's tokens past the shared prefix, plus the prefix once per
  worker that must hold it — max(prefixes, workers) computations, as every worker
  must run something;
- **makespan** (first send → last result, wall clock) over the **ideal**: the work
  with that minimum prefill, every step of every worker full, divided by the workers.

    .venv/bin/python bench/prefix_placement.py --gpus 8 32 --repeat 3
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Any

from benchlib import Daemon, emit, machine, median, running_daemon

logger = logging.getLogger("bench.prefix_placement")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def workload(args: argparse.Namespace, gpus: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{args.seed}|{gpus}|{seed}")
    prefixes = []
    for p in range(args.prefixes):
        words = [f"prefix{p}r{seed}"] + [rng.choice(WORDS) for _ in range(args.prefix_words - 1)]
        prefixes.append(" ".join(words))
    items = []
    for i in range(args.items_per_gpu * gpus):
        question = " ".join(f"q{i}w{j}" for j in range(args.question_words))
        items.append({"id": str(i), "prompt": f"{prefixes[i % len(prefixes)]} {question}"})
    rng.shuffle(items)
    return items


def minimum_prefill(items: list[dict[str, Any]], args: argparse.Namespace, gpus: int) -> int:
    """Every item's words past its prefix, plus each prefix max(prefixes, gpus) / prefixes
    times (the workers must all hold one)."""
    suffix = sum(len(item["prompt"].split()) - args.prefix_words for item in items)
    return suffix + max(args.prefixes, gpus) * args.prefix_words


def ideal_s(items: int, prefill: int, gpus: int, args: argparse.Namespace) -> float:
    step = args.token_ms + args.batch_ms * args.capacity
    decode_ms = items * args.new_tokens * step / args.capacity
    return (decode_ms + prefill * args.prefill_token_ms) / gpus / 1000


def counters(daemon: Daemon) -> dict[str, int]:
    out: dict[str, int] = {}
    for worker in daemon.status()["workers"]:
        for name, value in (worker.get("counters") or {}).items():
            out[name] = out.get(name, 0) + value
    return out


def one_run(daemon: Daemon, items: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    before = counters(daemon)
    params = {"max_new_tokens": args.new_tokens, "ignore_eos": True}
    with daemon.client(timeout=600, window=len(items)) as client:
        started = time.perf_counter()
        results = list(client.iter_results(items, **params))
        elapsed = time.perf_counter() - started
    bad = [r for r in results if not r.ok or r.completion_tokens != args.new_tokens]
    if len(results) != len(items) or bad or len({r.id for r in results}) != len(items):
        raise RuntimeError(f"{len(bad)} wrong results, {len(results)} of {len(items)}")
    time.sleep(2.5 * args.heartbeat_s)  # the workers' last counters reach the router
    after = counters(daemon)
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    return {
        "s": elapsed,
        "prefill": delta.get("prefill_tokens", 0),
        "hits": delta.get("prefix_hits", 0),
    }


def run(gpus: int, placement: str, args: argparse.Namespace) -> dict[str, Any]:
    opts = {
        "capacity": args.capacity,
        "token_ms": args.token_ms,
        "batch_ms": args.batch_ms,
        "prefill_token_ms": args.prefill_token_ms,
        "prefix_cache_tokens": args.cache_tokens,
        "paced": 1,
        "max_seq_len": 8192,
    }
    env = {"EXGEN_PLACEMENT": placement, "EXGEN_HEARTBEAT_INTERVAL_S": str(args.heartbeat_s)}
    rows = []
    with running_daemon(gpus, "synthetic", opts, env=env) as daemon:
        for r in range(args.repeat):
            items = workload(args, gpus, r)  # prefixes of its own: no round finds another's
            least = minimum_prefill(items, args, gpus)
            best = ideal_s(len(items), least, gpus, args)
            got = one_run(daemon, items, args)
            row = {
                "makespan_s": round(got["s"], 3),
                "ideal_s": round(best, 3),
                "makespan_over_ideal": round(got["s"] / best, 3),
                "prefill_tokens": got["prefill"],
                "min_prefill_tokens": least,
                "prefill_over_min": round(got["prefill"] / least, 3),
                "prefix_hits": got["hits"],
            }
            logger.info("%d GPUs, %s: %s", gpus, placement, row)
            rows.append(row)
    return {
        "gpus": gpus,
        "placement": placement,
        "items": args.items_per_gpu * gpus,
        "rounds": rows,
        "makespan_over_ideal": median([r["makespan_over_ideal"] for r in rows]),
        "prefill_over_min": median([r["prefill_over_min"] for r in rows]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--placements", nargs="+", default=["prefix", "count"])
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--prefix-words", type=int, default=400)
    parser.add_argument("--question-words", type=int, default=20)
    parser.add_argument("--items-per-gpu", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--token-ms", type=float, default=5.0)
    parser.add_argument("--batch-ms", type=float, default=0.1)
    parser.add_argument("--prefill-token-ms", type=float, default=0.1)
    parser.add_argument("--cache-tokens", type=int, default=16384)
    parser.add_argument("--heartbeat-s", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    doc = {
        "machine": machine(),
        "bench": "prefix_placement",
        "args": vars(args),
        "results": [run(g, p, args) for g in args.gpus for p in args.placements],
    }
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
