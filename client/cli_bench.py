"""``exgen-client bench``: measure a running daemon (tokens/s, prompts/s, latency)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from exgen.client import batchfile as B
from exgen.client import protocol as P
from exgen.client.cli_common import (
    connection_options,
    daemon_errors,
    open_client,
    sampling_options,
    sampling_params,
)
from exgen.client.client import Result, default_address
from exgen.client.exits import EXIT_FAILED, EXIT_HELP, EXIT_OK

BENCH_WORDS = "the quick brown fox jumps over the lazy dog near a quiet river at dawn".split()
BENCH_TOKENS = 64  # new tokens per generated prompt


@click.command(epilog=EXIT_HELP)
@click.argument(
    "prompts", required=False, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option("-n", "--count", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Prompts to generate when no PROMPTS file is given.")  # fmt: skip
@click.option("--prompt-words", type=click.IntRange(min=1), default=16, show_default=True,
              help="Words per generated prompt.")  # fmt: skip
@click.option("--window", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Items outstanding at once.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@sampling_options(
    f"Default {BENCH_TOKENS} for generated prompts; a PROMPTS file's lines keep their own "
    f"(else {P.DEFAULT_PARAMS['max_new_tokens']})."
)
@connection_options
def bench(
    prompts: Path | None,
    count: int,
    prompt_words: int,
    window: int,
    as_json: bool,
    address: str | None,
    timeout: float,
    **sampling: Any,
) -> None:
    """Measure a running daemon: tokens/s, prompts/s and latency percentiles.

    The workload is a PROMPTS .jsonl file (the lines submit takes; results are not
    written) or COUNT generated prompts. Latency is per prompt, from its send to its
    result.
    """
    defaults = sampling_params(sampling)
    items = _bench_items(prompts, count, prompt_words)
    if prompts is None:
        defaults.setdefault("max_new_tokens", BENCH_TOKENS)
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        client.window = window
        client.status()  # fail fast when nobody answers, before the clock starts
        started = time.monotonic()
        results = list(client.iter_results(items, **defaults))
        elapsed = time.monotonic() - started
    report = bench_report(results, elapsed)
    click.echo(json.dumps(report, indent=2) if as_json else format_bench(report))
    sys.exit(EXIT_OK if report["failed"] == 0 else EXIT_FAILED)


def _bench_items(prompts: Path | None, count: int, words: int) -> list[dict[str, Any]]:
    if prompts is None:
        return [
            {"id": f"bench-{i}", "prompt": " ".join(_bench_words(i, words))} for i in range(count)
        ]
    with open(prompts, "rb") as f:
        entries = list(B.read_batch(f))
    bad = [e for e in entries if isinstance(e, B.LineError)]
    if bad:
        raise click.BadParameter(
            f"{len(bad)} malformed line(s), first: {bad[0]}", param_hint="PROMPTS"
        )
    return [e.to_item() for e in entries if isinstance(e, B.BatchLine)]


def _bench_words(seed: int, words: int) -> list[str]:
    # Distinct prompts, so no layer can answer a repeat from a cache.
    return [BENCH_WORDS[(seed * 7 + j * 3) % len(BENCH_WORDS)] for j in range(words)] + [str(seed)]


def bench_report(results: list[Result], elapsed: float) -> dict[str, Any]:
    """The numbers of one bench run (pure, for tests)."""
    latencies = sorted(r.latency_s for r in results if r.ok)
    tokens = sum(r.completion_tokens for r in results)
    elapsed = max(elapsed, 1e-9)
    return {
        "prompts": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "wall_s": round(elapsed, 3),
        "prompts_per_s": round(len(results) / elapsed, 1),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "latency_s": {
            name: round(_nearest_rank(latencies, q), 4)
            for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
    }


def _nearest_rank(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def format_bench(report: dict[str, Any]) -> str:
    lat = report["latency_s"]
    return "\n".join(
        [
            f"prompts    {report['prompts']} ({report['failed']} failed)"
            f" in {report['wall_s']:.2f}s",
            f"prompts/s  {report['prompts_per_s']:,.1f}",
            f"tokens/s   {report['tokens_per_s']:,.1f} ({report['completion_tokens']:,} tokens)",
            "latency    " + "  ".join(f"{k} {_ms(v)}" for k, v in lat.items()),
        ]
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"
