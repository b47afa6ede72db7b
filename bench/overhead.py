"""Daemon overhead: one worker against the engine
driven directly in-process, on the same prompts; tokens/s and their ratio.

- transformers on the demo model (SmolLM2-135M, CPU): the seeds' prompts, greedy,
  the engine's default batch on both sides. Direct = ``bench_hf_direct.run_direct``
  (the engine's add/step loop in this process, model loaded once); daemon =
  ``exgen serve --workers 1`` with the same engine options, the prompts sent through
  one Client. Worker load time is
  the READY message's ``load_s`` (as ``exgen-client status`` shows it).
- synthetic, modelling a GPU step (``token_ms`` + ``batch_ms`` × active, capacity
  32): the pure cost of the router and worker around an engine that works.

Runs alternate (direct, daemon, direct, …) so load on a shared machine hits both.

    .venv/bin/python bench/overhead.py --repeat 3 --prompts 16
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import psutil
from benchlib import Daemon, emit, machine, median, running_daemon, seeds_prompts

from exgen.daemon.engines.base import Finished, Job, SamplingParams
from exgen.daemon.engines.synthetic import SyntheticEngine

logger = logging.getLogger("bench.overhead")


def hf_options(workers: int) -> dict[str, Any]:
    """Engine options for N workers sharing this machine's cores: as `exgen serve` runs
    them, the engine's own default batch (the seeds' method keeps its 16)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    return {"threads": threads}


def cpu_s(procs: list[psutil.Process]) -> float:
    """CPU seconds these processes have used: unlike wall time, barely moved by other
    people's work on a shared machine."""
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def daemon_procs(daemon: Daemon) -> list[psutil.Process]:
    router = psutil.Process(daemon.proc.pid)
    return [router, *router.children(), psutil.Process()]


def daemon_run(daemon: Daemon, items: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens/s through the daemon for these batch lines (their own max_new_tokens);
    CPU seconds of the router, its workers and this client."""
    wire = [
        {"id": str(i), "prompt": it["prompt"], "params": {"max_new_tokens": it["max_new_tokens"]}}
        for i, it in enumerate(items)
    ]
    procs = daemon_procs(daemon)
    cpu_before = cpu_s(procs)
    with daemon.client(timeout=600, window=len(wire)) as client:
        started = time.perf_counter()
        results = list(client.iter_results(wire))
        elapsed = time.perf_counter() - started
    cpu = cpu_s(procs) - cpu_before
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} prompts failed: {failed[0].error}")
    tokens = sum(r.completion_tokens for r in results)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "cpu_s": cpu}


def hf_direct_engine(threads: int) -> Any:
    # The worker's OpenMP wait (cpu_layout.CpuLayout.env) on this side too: under
    # libgomp's default spin the direct loop ran 1.6x the worker's 2 threads (4.8 s
    # against 7.9 s for 16 prompts, the same CPU seconds), which is the wait policy's
    # cost, not the daemon's. It must be set before torch (libgomp) loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from exgen.daemon.engines.hf import TransformersEngine

    engine = TransformersEngine(None, {"threads": str(threads)})
    engine.load()
    return engine


def hf_direct_run(engine: Any, items: list[dict[str, Any]]) -> dict[str, float]:
    from bench_hf_direct import run_direct  # the transformers engineer's direct loop

    max_new = items[0]["max_new_tokens"]
    me = [psutil.Process()]
    cpu_before = cpu_s(me)
    batch = engine.describe()["batch_size"]  # the same default batch as the daemon's worker
    out = run_direct([it["prompt"] for it in items], max_new, batch, engine=engine)
    return {
        "tokens": out["completion_tokens"],
        "seconds": out["generate_s"],
        "tokens_per_s": out["tokens_per_s"],
        "cpu_s": cpu_s(me) - cpu_before,
    }


def synthetic_direct(opts: dict[str, Any], prompts: int, max_new: int) -> dict[str, float]:
    engine = SyntheticEngine(None, {k: str(v) for k, v in opts.items()})
    engine.load()
    params = SamplingParams(max_new_tokens=max_new)
    for key in range(prompts):
        engine.add(Job(key, f"overhead {key}", None, params))
    tokens = 0
    started = time.perf_counter()
    while engine.pending:
        tokens += sum(e.completion_tokens for e in engine.step() if isinstance(e, Finished))
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def summarize(direct: list[dict[str, float]], daemon: list[dict[str, float]]) -> dict[str, Any]:
    d = median([r["tokens_per_s"] for r in direct])
    x = median([r["tokens_per_s"] for r in daemon])
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(direct, daemon, strict=True)]
    return {
        "direct_tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in direct],
        "daemon_tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in daemon],
        "direct_tokens_per_s": round(d, 1),
        "daemon_tokens_per_s": round(x, 1),
        "ratio_runs": [round(r, 3) for r in ratios],
        "ratio": round(median(ratios), 3),
        "overhead_pct": round((1 - median(ratios)) * 100, 1),
    }


def synthetic_overhead(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"capacity": 32, "token_ms": args.token_ms, "batch_ms": args.batch_ms}
    items = [
        {"prompt": f"overhead {i}", "max_new_tokens": args.synthetic_tokens}
        for i in range(args.synthetic_prompts)
    ]
    direct, daemon = [], []
    with running_daemon(1, "synthetic", opts) as d:
        for _ in range(args.repeat):
            direct.append(synthetic_direct(opts, len(items), args.synthetic_tokens))
            daemon.append(daemon_run(d, items))
            logger.info(
                "synthetic: direct %.0f, daemon %.0f tokens/s",
                direct[-1]["tokens_per_s"],
                daemon[-1]["tokens_per_s"],
            )
    summary = summarize(direct, daemon)
    return {"engine": "synthetic", "options": opts, "prompts": len(items), **summary}


def hf_overhead(args: argparse.Namespace) -> dict[str, Any]:
    items = seeds_prompts()[: args.prompts]
    opts = hf_options(1)
    engine = hf_direct_engine(opts["threads"])
    direct, daemon = [], []
    with running_daemon(1, "transformers", opts) as d:
        load_s = d.status()["workers"][0].get("load_s")
        for _ in range(args.repeat):
            direct.append(hf_direct_run(engine, items))
            daemon.append(daemon_run(d, items))
            logger.info(
                "transformers: direct %.1f, daemon %.1f tokens/s",
                direct[-1]["tokens_per_s"],
                daemon[-1]["tokens_per_s"],
            )
    return {
        "engine": "transformers",
        "options": opts,
        "prompts": len(items),
        "worker_load_s": load_s,
        "direct_load_s": round(engine.load_s, 2),
        **summarize(direct, daemon),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16, help="of the seeds' 100 (transformers)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--synthetic-prompts", type=int, default=640)
    parser.add_argument("--synthetic-tokens", type=int, default=50)
    parser.add_argument("--token-ms", type=float, default=2.0)
    parser.add_argument("--batch-ms", type=float, default=0.05)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    results = [synthetic_overhead(args)]
    if not args.skip_hf:
        results.append(hf_overhead(args))
    doc = {"machine": machine(), "bench": "overhead", "runs": args.repeat, "results": results}
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
