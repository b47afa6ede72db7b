"""Time to first token at a constant request rate: do rows join a running batch?

One CPU worker with the transformers engine and the demo model. Per engine setting
(the default, where jobs join a running batch at the next step, and ``exact=true``,
where a job that arrives mid-batch waits for the batch to end):

1. lone: TTFT of streamed requests sent one at a time (median);
2. capacity: requests/s when ``--burst`` requests are sent at once;
3. rate: requests sent at a constant rate of ``--share`` (default half) of that
   capacity, each streamed on a client of its own; TTFT p50 and p95.

The goal: p95 at half the capacity <= 3x the lone TTFT. Prints one JSON document
(and a markdown table on stderr).

    .venv/bin/python bench/ttft_rate.py --requests 40
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Daemon, emit, machine, median, percentile, running_daemon, seeds_prompts


def prompts(count: int) -> list[str]:
    seeds = [str(p["prompt"]) for p in seeds_prompts()]
    return [seeds[i % len(seeds)] for i in range(count)]


def first_token(daemon: Daemon, prompt: str, tokens: int, client: Any = None) -> float:
    """Seconds from sending to the first text chunk (the stream is read to its end)."""
    own = client is None
    client = client or daemon.client(timeout=300)
    started = time.perf_counter()
    first = float("nan")
    try:
        for text in client.stream(prompt, max_new_tokens=tokens, ignore_eos=True):
            if text and first != first:
                first = time.perf_counter() - started
    finally:
        if own:
            client.close()
    return first


def lone(daemon: Daemon, count: int, tokens: int) -> list[float]:
    with daemon.client(timeout=300) as client:
        times = [first_token(daemon, p, tokens, client) for p in prompts(count + 2)]
    return times[2:]  # two to warm up


def capacity(daemon: Daemon, burst: int, tokens: int) -> float:
    """Requests/s with ``burst`` requests in flight at once."""
    with daemon.client(timeout=600) as client:
        started = time.perf_counter()
        client.generate(prompts(burst), max_new_tokens=tokens, ignore_eos=True)
        return burst / (time.perf_counter() - started)


def at_rate(daemon: Daemon, rate: float, count: int, tokens: int) -> list[float]:
    """TTFTs of ``count`` requests sent ``1/rate`` seconds apart, each on its own client
    (made before its send time)."""
    times: list[float] = [float("nan")] * count
    texts = prompts(count)
    start = time.perf_counter() + 0.5

    def one(i: int) -> None:
        with daemon.client(timeout=600) as client:
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            times[i] = first_token(daemon, texts[i], tokens, client)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times


def measure(opts: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    with running_daemon(1, "transformers", opts) as daemon:
        alone = lone(daemon, args.lone, args.tokens)
        rps = capacity(daemon, args.burst, args.tokens)
        rate = rps * args.share
        load_before = machine()["load_avg"]
        ttft = at_rate(daemon, rate, args.requests, args.tokens)
    return {
        "opts": opts,
        "lone_ttft_ms": round(1000 * median(alone), 1),
        "capacity_rps": round(rps, 3),
        "rate_rps": round(rate, 3),
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1),
        "ttft_p95_ms": round(1000 * percentile(ttft, 95), 1),
        "p95_over_lone": round(percentile(ttft, 95) / median(alone), 2),
        "load_avg": load_before,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engine opts | lone TTFT | capacity | rate | TTFT p50 | TTFT p95 | p95 / lone | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opts = " ".join(f"{k}={v}" for k, v in r["opts"].items()) or "default"
        lines.append(
            f"| {opts} | {r['lone_ttft_ms']} ms | {r['capacity_rps']} req/s | "
            f"{r['rate_rps']} req/s | {r['ttft_p50_ms']} ms | {r['ttft_p95_ms']} ms | "
            f"{r['p95_over_lone']}x | {r['load_avg'][0]} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=40, help="requests sent at the rate")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--lone", type=int, default=8, help="lone requests measured")
    ap.add_argument("--burst", type=int, default=32, help="requests sent at once for capacity")
    ap.add_argument("--share", type=float, default=0.5, help="the rate, a share of capacity")
    ap.add_argument("--threads", default="2", help="the engine's torch threads")
    ap.add_argument("--exact-too", action="store_true", help="also measure exact=true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = [{"threads": args.threads}]
    if args.exact_too:
        settings.append({"threads": args.threads, "exact": "true"})
    rows = [measure(opts, args) for opts in settings]
    print(markdown(rows), file=sys.stderr)
    doc = {"bench": "ttft_rate", "machine": machine(), "results": rows, "args": vars(args)}
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
