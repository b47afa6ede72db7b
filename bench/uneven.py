"""Uneven work: queue-depth balancing against a static equal split.

Output lengths come from a long-tailed distribution (a bounded Pareto on 10…1,000
tokens, alpha 1). The synthetic engine models a GPU: one step advances every active
job by a token and lasts ``token_ms + batch_ms × active`` ms (step time rises with
batch size), at most ``capacity`` (32) jobs at once.

- **exgen**: the daemon with N synthetic workers (N simulated GPUs); the file is
  submitted through one Client; makespan = first send → last result, wall clock.
- **static split**: the seeds' method — ``split_between_processes`` hands process i
  the i-th contiguous 1/N of the file up front — on N engines with the same timing
  model, simulated exactly in virtual time (no sleeping, no process overhead, no
  scheduling noise: the split's best case).
- **ideal** = total work ÷ N, where a token's work is ``step(capacity) / capacity``
  (every step of every device full). No schedule can beat it.

Order matters to a static split: the file is written the way batch files are — in
blocks of one task each (the seeds' own file is ten prompts × 10 in blocks), the
blocks sorted by length into ten bands and shuffled. The same lengths shuffled item
by item are simulated too, to show what a static split costs when the file is
perfectly mixed.

Lengths are not given to the daemon: as with a real model, each task (block) has a
``max_new_tokens`` budget — the next power of two above its longest output, the kind
of cap a user sets per task — and each output ends at its own EOS below it (the
synthetic engine's ``eos_from_prompt``: the prompt carries ``len=N``, which only the
engine reads). The router orders a client's queue by budget (longest-first), which
is all it can know; "policy" simulates that order, "policy fifo" arrival order.

The workers sleep through the step time, so on a 2-core machine the daemon's
timing is sleep-dominated: CPU is not the bottleneck (the per-token Python cost of
the synthetic engine is a few µs against a step of 1–4 ms).

    .venv/bin/python bench/uneven.py --gpus 2 4 8 --repeat 3
"""

from __future__ import annotations

import argparse
import heapq
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from benchlib import Daemon, emit, machine, median, running_daemon

logger = logging.getLogger("bench.uneven")

MIN_TOKENS, MAX_TOKENS, ALPHA = 10, 1000, 1.0
BANDS = 10


def bounded_pareto(rng: random.Random, n: int) -> list[int]:
    """Inverse-CDF draws from a Pareto(alpha) truncated to [MIN_TOKENS, MAX_TOKENS]."""
    lo, hi = MIN_TOKENS**ALPHA, MAX_TOKENS**ALPHA
    out = []
    for _ in range(n):
        u = rng.random()
        x = (-(u * hi - u * lo - hi) / (hi * lo)) ** (-1 / ALPHA)
        out.append(max(MIN_TOKENS, min(MAX_TOKENS, round(x))))
    return out


def file_order(lengths: list[int], rng: random.Random) -> list[tuple[int, int]]:
    """(budget, length) as a batch file holds them: blocks of similar tasks, shuffled.

    A block's budget (max_new_tokens) is the next power of two above its longest
    output: a per-task cap, not the length of any one output.
    """
    ordered = sorted(lengths)
    size = -(-len(ordered) // BANDS)
    blocks = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    for block in blocks:
        rng.shuffle(block)
    rng.shuffle(blocks)
    return [(1 << (max(block) - 1).bit_length(), n) for block in blocks for n in block]


def longest_budget_first(items: list[tuple[int, int]]) -> list[int]:
    """Lengths in the order the router starts them: largest budget first, ties FIFO."""
    return [n for _, n in sorted(items, key=lambda item: -item[0])]


def step_ms(active: int, token_ms: float, batch_ms: float) -> float:
    return token_ms + batch_ms * active


def simulate_engine(
    lengths: Sequence[int], capacity: int, token_ms: float, batch_ms: float
) -> float:
    """Seconds one synthetic engine takes for these jobs, all added at once (FIFO).

    The engine's own rule: admit up to ``capacity``, every step adds one token to each
    active job. Between admissions the batch is fixed, so jump to the next finish.
    """
    waiting = deque(lengths)
    finish_at: list[int] = []  # heap of the token counter at which each active job ends
    tokens_done = 0  # steps taken so far (every active job gains one per step)
    elapsed_ms = 0.0
    while waiting or finish_at:
        while waiting and len(finish_at) < capacity:
            heapq.heappush(finish_at, tokens_done + waiting.popleft())
        steps = finish_at[0] - tokens_done
        elapsed_ms += steps * step_ms(len(finish_at), token_ms, batch_ms)
        tokens_done += steps
        while finish_at and finish_at[0] == tokens_done:
            heapq.heappop(finish_at)
    return elapsed_ms / 1000


def simulate_dynamic(lengths: Sequence[int], gpus: int, args: argparse.Namespace) -> float:
    """Seconds for exgen's policy at zero overhead: each engine pulls from one FIFO.

    Every engine keeps ``capacity`` jobs active and takes the next queued job the
    moment one ends (dispatch, sockets and Python cost nothing here): the best
    makespan queue-depth balancing can reach on this workload.
    """
    queue = deque(lengths)
    active: list[list[int]] = [[] for _ in range(gpus)]  # heaps of finish counters
    done = [0] * gpus  # tokens each engine's active jobs have gained (steps taken)
    clock = [0.0] * gpus
    events: list[tuple[float, int]] = []
    for g in range(gpus):
        events.append(_refill_and_schedule(queue, active[g], done[g], clock[g], g, args))
    heapq.heapify(events)
    makespan = 0.0
    while events:
        at, g = heapq.heappop(events)
        if not active[g]:
            makespan = max(makespan, at)
            continue
        done[g] = active[g][0]
        clock[g] = at
        while active[g] and active[g][0] == done[g]:
            heapq.heappop(active[g])
        heapq.heappush(events, _refill_and_schedule(queue, active[g], done[g], at, g, args))
    return makespan / 1000


def _refill_and_schedule(
    queue: deque[int], heap: list[int], done: int, now: float, g: int, args: argparse.Namespace
) -> tuple[float, int]:
    """Admit queued jobs up to capacity; when (ms) this engine's next job ends."""
    while queue and len(heap) < args.capacity:
        heapq.heappush(heap, done + queue.popleft())
    if not heap:
        return now, g
    steps = heap[0] - done
    return now + steps * step_ms(len(heap), args.token_ms, args.batch_ms), g


def static_split(lengths: list[int], gpus: int, args: argparse.Namespace) -> float:
    """split_between_processes: contiguous equal-count chunks; the slowest decides."""
    per, extra = divmod(len(lengths), gpus)
    chunks, start = [], 0
    for i in range(gpus):
        size = per + (1 if i < extra else 0)
        chunks.append(lengths[start : start + size])
        start += size
    return max(simulate_engine(c, args.capacity, args.token_ms, args.batch_ms) for c in chunks)


def ideal(lengths: list[int], gpus: int, args: argparse.Namespace) -> float:
    per_token_ms = step_ms(args.capacity, args.token_ms, args.batch_ms) / args.capacity
    return sum(lengths) * per_token_ms / gpus / 1000


def exgen_makespan(daemon: Daemon, tasks: list[tuple[int, int]]) -> float:
    lengths = [n for _, n in tasks]
    items = [
        {"id": str(i), "prompt": f"u{i} len={n}", "params": {"max_new_tokens": budget}}
        for i, (budget, n) in enumerate(tasks)
    ]
    with daemon.client(timeout=120, window=len(items)) as client:
        started = time.perf_counter()
        results = list(client.iter_results(items))
        elapsed = time.perf_counter() - started
    wrong = [r.id for r in results if not r.ok or r.completion_tokens != lengths[int(r.id)]]
    if len(results) != len(items) or wrong:
        raise RuntimeError(f"uneven: {len(wrong)} wrong results, {len(results)} of {len(items)}")
    return elapsed


def run_gpus(gpus: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed + gpus)
    tasks = file_order(bounded_pareto(rng, args.items_per_gpu * gpus), rng)
    lengths = [n for _, n in tasks]
    mixed = list(lengths)
    rng.shuffle(mixed)
    best = ideal(lengths, gpus, args)
    static = static_split(lengths, gpus, args)
    static_mixed = static_split(mixed, gpus, args)
    policy = simulate_dynamic(longest_budget_first(tasks), gpus, args)
    policy_fifo = simulate_dynamic(lengths, gpus, args)
    opts = {
        "capacity": args.capacity,
        "token_ms": args.token_ms,
        "batch_ms": args.batch_ms,
        "paced": int(args.paced),
        "eos_from_prompt": 1,
    }
    runs = []
    with running_daemon(gpus, "synthetic", opts) as daemon:
        for _ in range(args.repeat):
            runs.append(exgen_makespan(daemon, tasks))
            logger.info(
                "%d GPUs: exgen %.2fs, ideal %.2fs, static %.2fs", gpus, runs[-1], best, static
            )
    exgen = median(runs)
    return {
        "gpus": gpus,
        "items": len(lengths),
        "tokens": sum(lengths),
        "longest": max(lengths),
        "ideal_s": round(best, 3),
        "exgen_s_runs": [round(r, 3) for r in runs],
        "exgen_s": round(exgen, 3),
        "exgen_over_ideal": round(exgen / best, 3),
        "policy_over_ideal": round(policy / best, 3),
        "policy_fifo_over_ideal": round(policy_fifo / best, 3),
        "budgets": sorted({budget for budget, _ in tasks}),
        "static_s": round(static, 3),
        "static_over_ideal": round(static / best, 3),
        "static_mixed_over_ideal": round(static_mixed / best, 3),
        "speedup_vs_static": round(static / exgen, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--items-per-gpu", type=int, default=2000)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--token-ms", type=float, default=1.0)
    parser.add_argument("--batch-ms", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--no-paced",
        dest="paced",
        action="store_false",
        help="plain sleeps: host jitter on a loaded box adds up into the makespan",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    doc = {
        "machine": machine(),
        "bench": "uneven",
        "model": {
            "capacity": args.capacity,
            "token_ms": args.token_ms,
            "batch_ms": args.batch_ms,
            "lengths": f"bounded Pareto alpha {ALPHA:g} on [{MIN_TOKENS}, {MAX_TOKENS}]",
            "items_per_gpu": args.items_per_gpu,
            "paced": args.paced,
        },
        "runs": args.repeat,
        "results": [run_gpus(g, args) for g in args.gpus],
    }
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
