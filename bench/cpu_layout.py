"""CPU worker layouts of `exgen serve` on the demo model, on a quiet and on a busy machine.

Each layout (worker count x OpenMP threads per worker, OpenMP wait policy) serves
the seeds' workload through a real daemon, in alternating rounds; "busy" runs the
same with one competing process spinning on a core (what another user's job does
to a shared box). Writes its section of bench/RESULTS.md and prints the JSON.

    .venv/bin/python bench/cpu_layout.py --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from benchlib import machine, median, running_daemon, seeds_prompts
from peers import write_section

from exgen.client import errors

logger = logging.getLogger("bench.cpu_layout")

# name: (workers, threads per worker, OMP_WAIT_POLICY; "" = libgomp's default, which
# spins a while at a barrier before it sleeps, and warns once about the empty value)
LAYOUTS: dict[str, tuple[int, int, str]] = {
    "1 worker x 2 threads, libgomp's default wait (the old default)": (1, 2, ""),
    "1 worker x 2 threads, OMP_WAIT_POLICY=PASSIVE": (1, 2, "PASSIVE"),
    "2 workers x 1 thread": (2, 1, "PASSIVE"),
}
DEFAULT = "2 workers x 1 thread"  # what `exgen serve` now picks on 2 cores
SPIN = "import time\nwhile True: pass"


@contextlib.contextmanager
def competitor(busy: bool) -> Iterator[None]:
    """A process spinning on one core for the duration, when ``busy``."""
    if not busy:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def run_layout(name: str, items: list[dict[str, Any]], busy: bool, cap_s: float) -> dict[str, Any]:
    """One daemon run; past ``cap_s`` it stops and counts the tokens finished so far
    (then tokens/s is an upper bound: the unfinished batch's work is not counted)."""
    workers, threads, policy = LAYOUTS[name]
    env = {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": policy}
    got: list[Any] = []
    with running_daemon(workers, "transformers", {}, env=env) as daemon, competitor(busy):
        reader = threading.Thread(target=collect, args=(daemon, items, got), daemon=True)
        started = time.perf_counter()
        reader.start()
        reader.join(cap_s)
        seconds = time.perf_counter() - started
    capped = reader.is_alive()
    tokens = sum(r.completion_tokens for r in got if r.ok)
    out = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
           "capped": capped, "done": len(got)}  # fmt: skip
    logger.info("%s%s: %.1f tokens/s%s", name, " (busy)" if busy else "", out["tokens_per_s"],
                " (capped)" if capped else "")  # fmt: skip
    return out


def collect(daemon: Any, items: list[dict[str, Any]], got: list[Any]) -> None:
    wire = [
        {"id": str(i), "prompt": it["prompt"], "params": {"max_new_tokens": it["max_new_tokens"]}}
        for i, it in enumerate(items)
    ]
    with contextlib.suppress(errors.ExgenError), daemon.client(timeout=3600) as client:
        for result in client.iter_results(wire):
            got.append(result)


def measure(rounds: int, items: list[dict[str, Any]], cap_s: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    names = list(LAYOUTS)
    for r in range(rounds):
        for busy in (False, True):
            order = names if r % 2 == 0 else names[::-1]  # alternate who goes first
            for name in order:
                key = f"{name}|{'busy' if busy else 'quiet'}"
                runs.setdefault(key, []).append(run_layout(name, items, busy, cap_s))
    return runs


def render(runs: dict[str, Any], rounds: int, host: dict[str, Any]) -> str:
    lines = [
        "## CPU worker layout",
        "",
        f"`bench/cpu_layout.py --rounds {rounds}` on {host['cpu']}, {host['cores']} cores "
        f"(load average at start {host['load_avg']}): `exgen serve` on the demo model, the "
        "seeds' workload (100 prompts x 100 new tokens, greedy) through a real daemon, each "
        "layout in turn, alternating, quiet and with one competing process spinning on a "
        "core. Medians over the rounds; the ratio is busy ÷ quiet.",
        "",
        "| layout | quiet tokens/s | busy tokens/s | busy ÷ quiet | runs quiet / busy |",
        "|---|---|---|---|---|",
    ]
    for name in LAYOUTS:
        quiet = runs[f"{name}|quiet"]
        busy = runs[f"{name}|busy"]
        q = median([r["tokens_per_s"] for r in quiet])
        b = median([r["tokens_per_s"] for r in busy])
        mark = " (default)" if name == DEFAULT else ""
        shown = f"{_runs(quiet)} / {_runs(busy)}"
        lines.append(f"| {name}{mark} | {q:.1f} | {b:.1f} | {b / q:.2f} | {shown} |")
    lines += [
        "",
        f"A run past {runs['cap_s']:.0f} s was stopped (marked ≤: the tokens finished by "
        "then over the time, an upper bound).",
    ]
    return "\n".join(lines)


def _runs(runs: list[dict[str, Any]]) -> str:
    return ", ".join(("≤" if r["capped"] else "") + f"{r['tokens_per_s']:.0f}" for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--cap-s", type=float, default=240.0, help="stop a run after this")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    host = machine()
    items = seeds_prompts()[: args.prompts]
    runs = measure(args.rounds, items, args.cap_s)
    block = render({**runs, "cap_s": args.cap_s}, args.rounds, host)
    if not args.no_write:
        write_section("cpu_layout", block)
    print(json.dumps({"host": host, "runs": runs}, indent=2))
    print(block, file=sys.stderr)


if __name__ == "__main__":
    main()
