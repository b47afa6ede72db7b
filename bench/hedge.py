"""Hedging the tail: one of four simulated GPUs at half speed, hedging on and off.

The workload of bench/uneven.py (long-tailed output lengths, a bounded Pareto on
10…1,000 tokens, in a batch file's blocks, a ``max_new_tokens`` budget per block,
each output ending at its own EOS) on 4 synthetic workers, capacity 32, step =
``token_ms + batch_ms × active`` ms, ``paced``; the worker in slot 3 takes twice as
long for every step (``slow_slots=3``, ``slow_factor=2``: an older card, a card
throttled by heat).

- **ideal** = total work ÷ the pool's speed: a token's work is ``step(capacity) ÷
  capacity`` on a full-speed worker, and the pool does 3 + ½ workers' worth of it.
  No schedule beats it.
- **exgen** = first send → last result through one Client, wall clock, with
  ``hedge`` off and on: a fresh daemon per setting per round, the rounds alternating
  which goes first; medians. Every round checks that each id came back exactly once,
  ok, with its own length (nothing lost, nothing duplicated to the caller), and reads
  the router's hedge counters from ``status``.

    .venv/bin/python bench/hedge.py --repeat 3
    .venv/bin/python bench/hedge.py --repeat 3 --order fifo --items-per-gpu 1000
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections import Counter
from typing import Any

from benchlib import Daemon, emit, machine, median, running_daemon
from uneven import bounded_pareto, file_order, step_ms

logger = logging.getLogger("bench.hedge")

SLOW_SLOT = 3


def ideal(lengths: list[int], args: argparse.Namespace) -> float:
    per_token_ms = step_ms(args.capacity, args.token_ms, args.batch_ms) / args.capacity
    speed = args.gpus - 1 + 1 / args.slow_factor
    return sum(lengths) * per_token_ms / speed / 1000


def makespan(daemon: Daemon, tasks: list[tuple[int, int]]) -> tuple[float, dict[str, Any]]:
    """Seconds for the job, checking each id answered once, ok and whole."""
    items = [
        {"id": str(i), "prompt": f"h{i} len={n}", "params": {"max_new_tokens": budget}}
        for i, (budget, n) in enumerate(tasks)
    ]
    with daemon.client(timeout=300, window=len(items)) as client:
        started = time.perf_counter()
        results = list(client.iter_results(items))
        elapsed = time.perf_counter() - started
        status = client.status()
    seen = Counter(r.id for r in results)
    twice = [i for i, n in seen.items() if n > 1]
    missing = len(items) - len(seen)
    wrong = [r.id for r in results if not r.ok or r.completion_tokens != tasks[int(r.id)][1]]
    if twice or missing or wrong:
        raise RuntimeError(f"hedge: {len(twice)} twice, {missing} missing, {len(wrong)} wrong")
    by_slot = Counter(r.slot for r in results)
    return elapsed, {"hedges": status.get("hedges", {}), "by_slot": dict(sorted(by_slot.items()))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    tasks = file_order(bounded_pareto(rng, args.items_per_gpu * args.gpus), rng)
    lengths = [n for _, n in tasks]
    best = ideal(lengths, args)
    opts = {
        "capacity": args.capacity,
        "token_ms": args.token_ms,
        "batch_ms": args.batch_ms,
        "paced": 1,
        "eos_from_prompt": 1,
        "slow_slots": str(SLOW_SLOT),
        "slow_factor": args.slow_factor,
    }
    settings = ["on", "off"]
    runs: dict[str, list[float]] = {s: [] for s in settings}
    facts: dict[str, list[dict[str, Any]]] = {s: [] for s in settings}
    loads = []
    for round_ in range(args.repeat):
        for setting in settings if round_ % 2 == 0 else settings[::-1]:
            loads.append(round(os.getloadavg()[0], 2))
            env = {"EXGEN_HEDGE": "1" if setting == "on" else "0", "EXGEN_ORDER": args.order}
            with running_daemon(args.gpus, "synthetic", opts, env=env) as daemon:
                seconds, seen = makespan(daemon, tasks)
            runs[setting].append(seconds)
            facts[setting].append(seen)
            logger.info("round %d hedge %s: %.2fs", round_ + 1, setting, seconds)
            logger.info("ideal %.2fs; %s", best, seen)
    out: dict[str, Any] = {
        "bench": "hedge",
        "gpus": args.gpus,
        "slow": {"slot": SLOW_SLOT, "factor": args.slow_factor},
        "items": len(lengths),
        "tokens": sum(lengths),
        "longest": max(lengths),
        "ideal_s": round(best, 3),
        "order": args.order,
        "load_avg_1m": loads,
    }
    for setting in settings:
        out[f"hedge_{setting}"] = {
            "s_runs": [round(r, 3) for r in runs[setting]],
            "s": round(median(runs[setting]), 3),
            "over_ideal": round(median(runs[setting]) / best, 3),
            "over_ideal_runs": [round(r / best, 3) for r in runs[setting]],
            "rounds": facts[setting],
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--items-per-gpu", type=int, default=2000)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--token-ms", type=float, default=1.0)
    parser.add_argument("--batch-ms", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--slow-factor", type=float, default=2.0, help="slot 3's step time ×")
    parser.add_argument(
        "--order",
        default="longest-first",
        help="the router's order within a client's queue (fifo: long items may start last)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    doc = {"machine": machine(), **run(parse_args(argv))}
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
