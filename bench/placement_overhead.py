"""The router's own CPU per prompt with each placement setting, in-process.

No sockets, no worker processes, no client: one ``Router`` (sans-IO) fed SUBMIT
frames of one-token prompts with no prefix key, dispatching, and answered by fake
workers three items a turn — the zero-cost path of bench/router_capacity.py without
the other processes' CPU and the host's noise in it. Rounds alternate the order of
the settings; medians per setting.

    .venv/bin/python bench/placement_overhead.py --rounds 7

"staged" is placement "prefix" forced through the staging area (the path every
prompt took before the keyless path): what the keyless path saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import emit, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Finished
from exgen.daemon.net import wire
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network


def us_per_prompt(setting: str, prompts: int, workers: int, capacity: int) -> float:
    placement = "prefix" if setting == "staged" else setting
    table = SlotTable([Slot(i, None) for i in range(workers)])
    router = Router(Settings(placement=placement), table)
    router.dispatcher.keyless_path = setting != "staged"
    net = Network(router)
    for i in range(workers):
        net.worker_ready(table.by_id[i], 1000 + i, capacity=capacity)
    items = [
        {"id": str(i), "prompt": f"p{i}", "params": {"max_new_tokens": 1}} for i in range(prompts)
    ]
    started = time.perf_counter()
    for first in range(0, prompts, 512):
        body = {"req": "r", "items": items[first : first + 512]}
        router.on_client([b"c", *P.pack(P.SUBMIT, body)], 0.0)
    router.outbox.take_clients()
    done, now = 0, 1.0
    while done < prompts:
        router.dispatch(now)
        router.outbox.take_workers()
        for slot in table.serving():
            assert slot.serving is not None
            held = sorted(router.ledger.held_by(slot.id))[:3]
            if held:
                finished = [Finished(k, "t", "length", 1, 1) for k in held]
                router.on_worker([slot.serving.identity, *wire.pack_done(finished, [])], now)
                done += len(held)
        router.flush_results(now)
        router.outbox.take_clients()
        now += 0.001
    return (time.perf_counter() - started) / prompts * 1e6


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[float]] = {s: [] for s in args.settings}
    loads = []
    for round_ in range(args.rounds):
        order = args.settings if round_ % 2 == 0 else args.settings[::-1]
        loads.append(round(os.getloadavg()[0], 2))
        for setting in order:
            runs[setting].append(us_per_prompt(setting, args.prompts, args.workers, args.capacity))
    out: dict[str, Any] = {"bench": "placement_overhead", "prompts": args.prompts,
                           "workers": args.workers, "load_avg_1m": loads}  # fmt: skip
    for setting, values in runs.items():
        out[setting] = {
            "router_us_per_prompt": round(statistics.median(values), 2),
            "runs": [round(v, 2) for v in values],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["count", "prefix", "staged"])
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    emit({"machine": machine(), **run(parser.parse_args())})


if __name__ == "__main__":
    main()
