"""Router capacity: how many prompts/s the daemon itself can move.

A zero-cost synthetic engine (token_ms = batch_ms = 0: every job ends in one step)
behind ``--workers`` workers, so everything measured is the daemon's own cost:
client library → router → worker → router → client.

- Throughput: ``--prompts`` one-token items through one Client, batched submits
  (512 items a frame, a window of ``--window`` items outstanding); prompts/s from
  the first send to the last result.
- Latency: one prompt at a time (low load), ``--latency-samples`` times; the
  round trip through the daemon against the same engine driven in-process, and
  the difference (the latency the daemon adds), p50 and p99.

    .venv/bin/python bench/router_capacity.py --repeat 3
    .venv/bin/python bench/router_capacity.py --placements prefix count --repeat 6

``--placements``: a daemon per placement setting, side by side in one run: each
round runs every setting once on a fresh daemon, the rounds alternating which goes
first; medians per setting.

On a 2-core machine the client, the router and the workers share the cores, so
the client's and the workers' CPU is inside the prompts/s. The CPU time each
process spends per prompt is recorded too: 1 ÷ the router's is the rate the
router alone could carry on a core of its own (its ceiling).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import psutil
from benchlib import Daemon, emit, machine, median, percentile, running_daemon

from exgen.daemon.engines.base import Job, SamplingParams
from exgen.daemon.engines.synthetic import SyntheticEngine

logger = logging.getLogger("bench.router_capacity")


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def throughput(daemon: Daemon, prompts: int, window: int) -> tuple[float, dict[str, float]]:
    """Prompts/s, and CPU µs per prompt spent by the router, the workers, the client."""
    items = ({"id": str(i), "prompt": f"p{i}"} for i in range(prompts))
    router = psutil.Process(daemon.proc.pid)
    workers = router.children()
    me = psutil.Process()
    before = [cpu_seconds(router), sum(map(cpu_seconds, workers)), cpu_seconds(me)]
    done = 0
    with daemon.client(timeout=60, window=window) as client:
        started = time.perf_counter()
        for result in client.iter_results(items, max_new_tokens=1):
            done += result.ok
        elapsed = time.perf_counter() - started
    after = [cpu_seconds(router), sum(map(cpu_seconds, workers)), cpu_seconds(me)]
    if done != prompts:
        raise RuntimeError(f"{prompts - done} prompts failed")
    used = [(a - b) * 1e6 / prompts for a, b in zip(after, before, strict=True)]
    return prompts / elapsed, dict(zip(("router", "workers", "client"), used, strict=True))


def daemon_latencies(daemon: Daemon, samples: int) -> list[float]:
    """Seconds per single-prompt round trip, one at a time, on one connected client."""
    out = []
    with daemon.client(timeout=30) as client:
        for i in range(samples + 20):
            started = time.perf_counter()
            [result] = client.generate([f"latency {i}"], max_new_tokens=1)
            elapsed = time.perf_counter() - started
            result.raise_for_error()
            if i >= 20:  # the first round trips warm up sockets and caches
                out.append(elapsed)
    return out


def engine_latencies(samples: int, capacity: int) -> list[float]:
    """The same job through the same engine in-process: add, then step to the end."""
    engine = SyntheticEngine(None, {"capacity": str(capacity)})
    engine.load()
    params = SamplingParams(max_new_tokens=1)
    out = []
    for i in range(samples):
        started = time.perf_counter()
        engine.add(Job(i, f"latency {i}", None, params))
        while engine.pending:
            engine.step()
        out.append(time.perf_counter() - started)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"capacity": args.capacity, "token_ms": 0, "batch_ms": 0}
    rates: list[float] = []
    cpu: list[dict[str, float]] = []
    p50s: list[float] = []
    p99s: list[float] = []
    with running_daemon(args.workers, "synthetic", opts) as daemon:
        for round_ in range(args.repeat):
            rate, used = throughput(daemon, args.prompts, args.window)
            rates.append(rate)
            cpu.append(used)
            lat = daemon_latencies(daemon, args.latency_samples)
            base = engine_latencies(args.latency_samples, args.capacity)
            p50s.append(percentile(lat, 50) - percentile(base, 50))
            p99s.append(percentile(lat, 99) - percentile(base, 50))
            logger.info(
                "round %d: %.0f prompts/s; round trip p50 %.3f ms (engine alone %.4f ms)",
                round_ + 1,
                rates[-1],
                percentile(lat, 50) * 1e3,
                percentile(base, 50) * 1e3,
            )
    return {
        "bench": "router_capacity",
        "workers": args.workers,
        "capacity": args.capacity,
        "prompts": args.prompts,
        "window": args.window,
        "runs": args.repeat,
        "prompts_per_s_runs": [round(r) for r in rates],
        "prompts_per_s": round(median(rates)),
        "cpu_us_per_prompt": {k: round(median([c[k] for c in cpu]), 1) for k in cpu[0]},
        "router_ceiling_prompts_per_s": round(1e6 / median([c["router"] for c in cpu])),
        "added_p50_ms_runs": [round(x * 1e3, 3) for x in p50s],
        "added_p50_ms": round(median(p50s) * 1e3, 3),
        "added_p99_ms": round(median(p99s) * 1e3, 3),
        "engine_alone_p50_ms": round(percentile(base, 50) * 1e3, 4),
    }


def compare_placements(args: argparse.Namespace) -> dict[str, Any]:
    """Each round: every placement on its own daemon, alternating which goes first."""
    opts = {"capacity": args.capacity, "token_ms": 0, "batch_ms": 0}
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in args.placements}
    loads = []
    for round_ in range(args.repeat):
        order = args.placements if round_ % 2 == 0 else args.placements[::-1]
        for placement in order:
            loads.append(round(os.getloadavg()[0], 2))
            env = {"EXGEN_PLACEMENT": placement}
            with running_daemon(args.workers, "synthetic", opts, env=env) as daemon:
                rate, used = throughput(daemon, args.prompts, args.window)
                lat = daemon_latencies(daemon, args.latency_samples)
            runs[placement].append({"rate": rate, "cpu": used, "p50": percentile(lat, 50)})
            logger.info("round %d %s: %.0f prompts/s, router %.1f µs/prompt",
                        round_ + 1, placement, rate, used["router"])  # fmt: skip
    out: dict[str, Any] = {
        "bench": "router_capacity_placements",
        "workers": args.workers,
        "prompts": args.prompts,
        "rounds": args.repeat,
        "load_avg_1m": loads,
    }
    for placement, rows in runs.items():
        out[placement] = {
            "prompts_per_s": round(median([r["rate"] for r in rows])),
            "prompts_per_s_runs": [round(r["rate"]) for r in rows],
            "router_us_per_prompt": round(median([r["cpu"]["router"] for r in rows]), 1),
            "router_us_runs": [round(r["cpu"]["router"], 1) for r in rows],
            "workers_us_per_prompt": round(median([r["cpu"]["workers"] for r in rows]), 1),
            "round_trip_p50_ms": round(median([r["p50"] for r in rows]) * 1e3, 3),
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=8, help="the synthetic default")
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--latency-samples", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--placements", nargs="+", help="compare these placement settings")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    doc = {"machine": machine(), **(compare_placements(args) if args.placements else run(args))}
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
