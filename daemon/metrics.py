"""Prometheus metrics, served by a thread of the supervisor process.

The daemon's loop owns every number, and the HTTP thread must never walk the
router's dicts while the loop changes them. So once a second the loop folds its
status into an immutable snapshot and the collector serves the latest one: a
scrape costs the loop nothing, and values are at most a second old. The only
per-item cost is in the router, which appends each result's latency to a list
that the next refresh folds into the histogram's buckets.

The registry is our own, not prometheus_client's global one, so nothing a library
registers leaks into our endpoint.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exgen.daemon.supervisor import supervisor as sup

logger = logging.getLogger("exgen.metrics")

# Accept → result. A batch job queues for minutes to hours, a lone prompt for
# under a second: the buckets span both.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, math.inf)
STATES = (sup.STARTING, sup.READY, sup.RESTARTING, sup.FAILED, sup.STOPPED)


@dataclass(frozen=True, slots=True)
class SlotSample:
    slot: str
    state: str
    tokens: int
    completed: int
    failed: int
    inflight: int
    restarts: int
    load_s: float | None
    counters: tuple[tuple[str, int], ...] = ()  # the engine's (status "counters")


@dataclass(frozen=True, slots=True)
class Snapshot:
    slots: tuple[SlotSample, ...] = ()
    queued: int = 0
    inflight: int = 0
    completed: int = 0
    failed: int = 0
    hedge_copies: int = 0  # second copies sent (hedging); hedge_won: those answered first
    hedge_won: int = 0
    draining: bool = False
    engine: str = ""
    model: str = ""
    instance: str = ""
    latency_buckets: tuple[int, ...] = (0,) * len(LATENCY_BUCKETS)  # not cumulative
    latency_sum: float = 0.0


@dataclass(slots=True)
class _Latencies:
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0

    def fold(self, values: list[float]) -> None:
        counts = self.counts
        for value in values:
            counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += math.fsum(values)


class Metrics:
    """The endpoint: ``start()``, then ``refresh(status)`` from the loop, ``close()``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        # The router appends accept → result seconds here; refresh() empties it.
        self.latencies: list[float] = []
        self._latency = _Latencies()
        self._load_s: dict[str, float] = {}  # a slot's last load time survives its restart
        self.snapshot = Snapshot()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # the supervisor's memory, CPU, fds
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> str:
        """Listen; the URL (with the real port when 0 was asked for). OSError if taken."""
        self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        port = self._server.server_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = f"http://{host}:{port}/metrics"
        logger.info("metrics on %s", url)
        return url

    def refresh(self, status: dict[str, Any]) -> None:
        """Fold the daemon's status and the latencies since last time into a snapshot."""
        self._latency.fold(self.latencies)
        self.latencies.clear()
        slots = tuple(self._sample(w) for w in status["workers"])
        self.snapshot = Snapshot(
            slots=slots,
            queued=int(status["queued"]),
            inflight=int(status["inflight"]),
            completed=int(status["completed"]),
            failed=int(status["failed"]),
            hedge_copies=int(status.get("hedges", {}).get("copies", 0)),
            hedge_won=int(status.get("hedges", {}).get("won", 0)),
            draining=bool(status["draining"]),
            engine=str(status.get("engine") or ""),
            model=str(status.get("model") or ""),
            instance=str(status.get("instance") or ""),
            latency_buckets=tuple(self._latency.counts),
            latency_sum=self._latency.total,
        )

    def _sample(self, worker: dict[str, Any]) -> SlotSample:
        slot = str(worker["slot"])
        if worker.get("load_s") is not None:
            self._load_s[slot] = float(worker["load_s"])
        return SlotSample(
            slot=slot,
            state=str(worker["state"]),
            tokens=int(worker.get("tokens", 0)),
            completed=int(worker.get("completed", 0)),
            failed=int(worker.get("failed", 0)),
            inflight=int(worker.get("inflight", 0)),
            restarts=int(worker.get("restarts", 0)),
            load_s=self._load_s.get(slot),
            counters=tuple(sorted((worker.get("counters") or {}).items())),
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


class _Collector(Collector):
    """Turns the latest snapshot into metric families at scrape time (HTTP thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot  # one read of an immutable object: consistent
        yield from _slot_families(snap.slots)
        yield from _daemon_families(snap)
        yield _latency_family(snap)


def _slot_families(slots: tuple[SlotSample, ...]) -> Iterator[Metric]:
    per_slot: list[tuple[type, str, str, str]] = [
        (CounterMetricFamily, "exgen_worker_tokens", "Tokens generated", "tokens"),
        (CounterMetricFamily, "exgen_worker_prompts_completed", "Prompts done", "completed"),
        (CounterMetricFamily, "exgen_worker_prompts_failed", "Prompts failed", "failed"),
        (CounterMetricFamily, "exgen_worker_restarts", "Worker restarts", "restarts"),
        (GaugeMetricFamily, "exgen_worker_inflight", "Prompts on the worker now", "inflight"),
    ]
    for kind, name, doc, attr in per_slot:
        family = kind(name, f"{doc}, per slot", labels=["slot"])
        for s in slots:
            family.add_metric([s.slot], getattr(s, attr))
        yield family
    load = GaugeMetricFamily(
        "exgen_worker_load_seconds", "Seconds the slot's engine took to load", labels=["slot"]
    )
    state = GaugeMetricFamily(
        "exgen_worker_state", "1 for the slot's current state", labels=["slot", "state"]
    )
    for s in slots:
        if s.load_s is not None:
            load.add_metric([s.slot], s.load_s)
        for name in STATES:
            state.add_metric([s.slot, name], 1.0 if s.state == name else 0.0)
    yield load
    yield state
    yield from _engine_families(slots)


# The engine counters a worker's heartbeats carry (prefix cache), as counter families.
ENGINE_COUNTERS = (
    ("prefix_lookups", "exgen_worker_prefix_lookups", "Prompts looked up in the prefix cache"),
    ("prefix_hits", "exgen_worker_prefix_hits", "Prompts that found a cached prefix"),
    ("prefill_tokens_saved", "exgen_worker_prefill_tokens_saved", "Prompt tokens a cached "
     "prefix saved from prefill"),
    ("prefill_tokens", "exgen_worker_prefill_tokens", "Prompt tokens prefilled"),
)  # fmt: skip


def _engine_families(slots: tuple[SlotSample, ...]) -> Iterator[Metric]:
    """Only the counters some worker reports: an engine without a prefix cache has none."""
    for key, name, doc in ENGINE_COUNTERS:
        rows = [(s.slot, dict(s.counters)[key]) for s in slots if key in dict(s.counters)]
        if rows:
            family = CounterMetricFamily(name, f"{doc}, per slot", labels=["slot"])
            for slot, value in rows:
                family.add_metric([slot], value)
            yield family


def _daemon_families(snap: Snapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily("exgen_queue_length", "Prompts waiting for a worker", snap.queued)
    yield GaugeMetricFamily(
        "exgen_inflight", "Prompts on workers (with hedged copies)", snap.inflight
    )
    yield CounterMetricFamily(
        "exgen_prompts_completed", "Prompts answered with a result", snap.completed
    )
    yield CounterMetricFamily(
        "exgen_prompts_failed", "Prompts answered with an error (all causes)", snap.failed
    )
    yield CounterMetricFamily(
        "exgen_hedge_copies",
        "Second copies of running prompts sent to idle workers",
        snap.hedge_copies,
    )
    yield CounterMetricFamily(
        "exgen_hedge_won", "Hedged prompts answered first by their copy", snap.hedge_won
    )
    yield GaugeMetricFamily("exgen_draining", "1 while draining for a stop", float(snap.draining))
    info = GaugeMetricFamily(
        "exgen_info", "The daemon's engine and model", labels=["engine", "model", "instance"]
    )
    info.add_metric([snap.engine, snap.model, snap.instance], 1.0)
    yield info


def _latency_family(snap: Snapshot) -> Metric:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(LATENCY_BUCKETS, snap.latency_buckets, strict=True):
        running += count
        buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), running))
    return HistogramMetricFamily(
        "exgen_request_latency_seconds",
        "Seconds from a prompt's acceptance to its result being sent",
        buckets=buckets,
        sum_value=snap.latency_sum,
    )
