"""Prefix placement with real processes: a daemon of synthetic workers that model a
prefix cache. Items sharing a prefix run where it is cached; the results say how many
tokens were; status and metrics show the hits and the prefill saved per worker; a
worker killed mid-run loses nothing and its prefixes go elsewhere."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import Counter

from tests.conftest import wait_for
from tests.netutil import free_port

PREFIXES = [f"prefix {p} " + " ".join(f"shot{p}x{i}" for i in range(159)) for p in range(4)]
OPTS = ("prefix_cache_tokens=100000", "prefill_token_ms=0.01", "token_ms=2", "capacity=4")


def start(daemon_factory, workers: int, *extra: str):
    opts = [arg for opt in OPTS for arg in ("--engine-opt", opt)]
    args = ("--engine", "synthetic", "--workers", str(workers), *opts, *extra)
    return daemon_factory(*args, env={"EXGEN_HEARTBEAT_INTERVAL_S": "0.2"})


def items(n: int, tag: str = "q") -> list[dict]:
    return [
        {"id": f"{tag}{i}", "prompt": f"{PREFIXES[i % 4]} {tag}{i} what now?"} for i in range(n)
    ]


def test_each_prefix_runs_on_one_worker_and_results_say_what_was_cached(daemon_factory):
    daemon = start(daemon_factory, 4)
    with daemon.client(timeout=60) as client:
        results = client.generate(items(80), max_new_tokens=4)
    assert sorted(r.id for r in results) == sorted(f"q{i}" for i in range(80))
    slots_of = {p: {r.slot for r in results if int(r.id[1:]) % 4 == p} for p in range(4)}
    assert all(len(s) == 1 for s in slots_of.values())  # one worker each
    assert len(set.union(*slots_of.values())) == 4  # spread: a worker each
    hits = [r.cached_tokens for r in results]
    assert Counter(h > 0 for h in hits)[True] == 76  # all but each prefix's first
    assert max(hits) == 160


def test_a_small_job_of_one_prefix_does_not_wait_on_one_worker(daemon_factory):
    """10 items of one new prefix, 2 workers of capacity 4: the first takes 4 and 2 of
    prefetch; the 4 left would wait behind its prefetch (past one batch of it) while
    the other idled, so the other takes them up."""
    daemon = start(daemon_factory, 2)
    job = [{"id": f"s{i}", "prompt": f"{PREFIXES[0]} s{i} what now?"} for i in range(10)]
    with daemon.client(timeout=60) as client:
        results = client.generate(job, max_new_tokens=4)
    assert sorted(r.id for r in results) == sorted(f"s{i}" for i in range(10))
    assert all(r.error is None for r in results)
    assert sorted(Counter(r.slot for r in results).values()) == [4, 6]


def test_status_and_metrics_show_prefix_hits_per_worker(daemon_factory):
    port = free_port()
    daemon = start(daemon_factory, 2, "--metrics", f"127.0.0.1:{port}")
    with daemon.client(timeout=60) as client:
        client.generate(items(40), max_new_tokens=2)

    def saved() -> int:
        return sum((w.get("counters") or {}).get("prefill_tokens_saved", 0)
                   for w in daemon.status()["workers"])  # fmt: skip

    wait_for(lambda: saved() == 36 * 160, 10, "the counters in the heartbeats")
    hits = [w["counters"]["prefix_hits"] for w in daemon.status()["workers"]]
    assert sum(hits) == 36
    wait_for(lambda: "exgen_worker_prefix_hits_total" in _scrape(port), 10, "the metrics' refresh")
    text = _scrape(port)
    assert "exgen_worker_prefill_tokens_saved_total" in text
    total = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("exgen_worker_prefix_hits_total{")
    )
    assert total == 36


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def test_a_worker_killed_mid_run_loses_nothing_and_its_prefixes_move(daemon_factory):
    daemon = start(daemon_factory, 3)
    victim = daemon.worker_pids()[0]
    with daemon.client(timeout=120) as client:
        ids = []
        for result in client.iter_results(items(300, "k"), max_new_tokens=8):
            ids.append(result.id)
            assert result.ok, result.error
            if len(ids) == 30:
                os.kill(victim, signal.SIGKILL)
    assert sorted(ids) == sorted(f"k{i}" for i in range(300))  # each once
    wait_for(lambda: daemon.worker_pids().get(0) not in (None, victim), 30, "the restart")
    time.sleep(0.1)
