"""`exgen-client bench`: the report's arithmetic (the command itself runs in bench/)."""

from __future__ import annotations

from exgen.client import errors
from exgen.client.cli_bench import bench_report, format_bench
from exgen.client.client import Result


def result(i: int, latency: float, tokens: int = 10, ok: bool = True) -> Result:
    error = None if ok else errors.EngineError("boom", item_id=str(i))
    return Result(str(i), "x", "length", 3, tokens, 0, error, latency)


def test_report_counts_rates_and_percentiles() -> None:
    results = [result(i, latency=(i + 1) / 100) for i in range(100)]
    report = bench_report(results, elapsed=2.0)
    assert report["prompts"] == 100 and report["failed"] == 0
    assert report["prompts_per_s"] == 50.0
    assert report["tokens_per_s"] == 500.0
    assert report["latency_s"]["p50"] == 0.5 or report["latency_s"]["p50"] == 0.51
    assert report["latency_s"]["max"] == 1.0
    assert "p99" in format_bench(report)


def test_failed_items_are_counted_and_left_out_of_latency() -> None:
    results = [result(0, 0.1), result(1, 9.0, tokens=0, ok=False)]
    report = bench_report(results, elapsed=1.0)
    assert report["failed"] == 1
    assert report["latency_s"]["max"] == 0.1
