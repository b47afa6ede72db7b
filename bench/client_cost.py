"""The client library's own cost per prompt, this tree against an older revision,
side by side in one run (the multiplexing core must not make it grow).

One daemon (a zero-cost synthetic engine, as in router_capacity.py) serves both
clients in alternating rounds, so load on a shared machine hits both alike. The old
client is the ``client/`` package of ``--baseline`` (default: main) read from git into
a temporary directory and imported under another name; the daemon is this tree's.

    .venv/bin/python bench/client_cost.py --baseline main --rounds 5

Per round and client: prompts/s through ``iter_results`` and the CPU µs per prompt
of the client process (the number the router benchmark records as "client").
"""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from benchlib import ROOT, emit, machine, median, running_daemon

logger = logging.getLogger("bench.client_cost")
BASELINE_PACKAGE = "exgen_baseline_client"


def load_baseline_client(revision: str, into: Path) -> Any:
    """The Client class of ``revision``'s client/ package, importable beside ours."""
    names = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{revision}:client"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    package = into / BASELINE_PACKAGE
    package.mkdir()
    for name in names:
        if not name.endswith(".py"):
            continue
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{revision}:client/{name}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        (package / name).write_text(source.replace("exgen.client", BASELINE_PACKAGE))
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{BASELINE_PACKAGE}.client").Client


def one_round(client_class: Any, address: str, prompts: int, window: int) -> tuple[float, float]:
    """(prompts/s, client CPU µs per prompt) for one pass of ``prompts`` items."""
    items = ({"id": str(i), "prompt": f"p{i}"} for i in range(prompts))
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    done = 0
    with client_class(address, timeout=60, window=window) as client:
        started = time.perf_counter()
        for result in client.iter_results(items, max_new_tokens=1):
            done += result.ok
        elapsed = time.perf_counter() - started
    if done != prompts:
        raise RuntimeError(f"{prompts - done} prompts failed")
    cpu_us = (sum(me.cpu_times()[:2]) - cpu_before) * 1e6 / prompts
    return prompts / elapsed, cpu_us


def run(args: argparse.Namespace) -> dict[str, Any]:
    from exgen.client import Client

    opts = {"capacity": args.capacity, "token_ms": 0, "batch_ms": 0}
    with tempfile.TemporaryDirectory(prefix="exgen-baseline-") as tmp:
        clients = {"baseline": load_baseline_client(args.baseline, Path(tmp)), "current": Client}
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
        with running_daemon(args.workers, "synthetic", opts) as daemon:
            one_round(Client, daemon.address, min(args.prompts, 5000), args.window)  # warm up
            for round_ in range(args.rounds):
                order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
                for name in order:
                    rows[name].append(
                        one_round(clients[name], daemon.address, args.prompts, args.window)
                    )
                    rate, cpu = rows[name][-1]
                    logger.info("round %d %s: %.0f prompts/s, %.1f µs", round_ + 1, name, rate, cpu)
    ratios = [c[1] / b[1] for b, c in zip(rows["baseline"], rows["current"], strict=True)]
    return {
        "bench": "client_cost",
        "baseline": args.baseline,
        "workers": args.workers,
        "prompts": args.prompts,
        "window": args.window,
        "rounds": args.rounds,
        **{
            f"{name}_{key}": round(median([r[i] for r in rows[name]]), 1)
            for name in rows
            for i, key in enumerate(("prompts_per_s", "client_cpu_us_per_prompt"))
        },
        "cpu_ratio_runs": [round(r, 3) for r in ratios],
        "cpu_ratio_current_over_baseline": round(median(ratios), 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision of the old client")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    doc = {"machine": machine(), **run(parse_args(argv))}
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
