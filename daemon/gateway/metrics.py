"""The gateway's Prometheus metrics (``GET /metrics``): its own requests, the batches in
its store, and the daemon's state as its latest status document shows it.

A registry of our own, as the daemon's metrics module keeps: nothing a library
registers leaks in. Batch and daemon numbers are read at scrape time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exgen.daemon.gateway.store import Store
from exgen.daemon.gateway.upstream import Upstream

# An interactive request takes from milliseconds (a few tokens) to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, math.inf)


class _StateCollector(Collector):
    def __init__(self, store: Store, upstream: Upstream) -> None:
        self.store = store
        self.upstream = upstream

    def collect(self) -> Iterator[Metric]:
        batches = GaugeMetricFamily("exgen_http_batches", "Batches by status", labels=["status"])
        requests = GaugeMetricFamily(
            "exgen_http_batch_requests", "Requests of unfinished batches", labels=["state"]
        )
        rows = self.store.db.execute(
            "SELECT status, COUNT(*), SUM(total), SUM(completed), SUM(failed) FROM batches "
            "GROUP BY status"
        ).fetchall()
        waiting = done = failed = 0
        for status, count, total, completed, fails in rows:
            batches.add_metric([status], count)
            if status in ("validating", "in_progress", "cancelling", "finalizing"):
                waiting += (total or 0) - (completed or 0) - (fails or 0)
                done += completed or 0
                failed += fails or 0
        for state, value in (("waiting", waiting), ("completed", done), ("failed", failed)):
            requests.add_metric([state], value)
        yield batches
        yield requests
        status = self.upstream.status
        ready = sum(1 for w in status.get("workers", ()) if w.get("state") == "ready")
        yield GaugeMetricFamily("exgen_http_daemon_workers_ready", "Workers ready", value=ready)
        yield GaugeMetricFamily(
            "exgen_http_daemon_queued", "Items waiting in the router", value=status.get("queued", 0)
        )


class GatewayMetrics:
    def __init__(self, store: Store, upstream: Upstream) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "exgen_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "exgen_http_request_duration_seconds",
            "Time to the end of the answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "exgen_http_inflight", "Interactive requests being answered", registry=self.registry
        )
        self.registry.register(_StateCollector(store, upstream))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
