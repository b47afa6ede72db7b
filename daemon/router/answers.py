"""Every accepted item's one answer goes through here, into its client's results.

The results wait in the client's record until the tick's flush groups them into
RESULTS messages (delivery.py). The time from accept to answer is sampled for the
metrics when they are on.
"""

from __future__ import annotations

from typing import Any

from exgen.client import protocol as P
from exgen.daemon.router.clients import ClientRegistry
from exgen.daemon.router.ledger import Entry


class Answers:
    def __init__(self, clients: ClientRegistry, latencies: list[float] | None) -> None:
        self.clients = clients
        # Accept → answer seconds, for the metrics (which empty it); None when off.
        self.latencies = latencies

    def answer(self, entry: Entry, result: dict[str, Any], now: float) -> None:
        if self.latencies is not None:
            self.latencies.append(now - entry.accepted_at)
        self.clients.queue_result(entry.client, result, now)

    def fail(self, entries: list[Entry], code: str, message: str, now: float) -> None:
        for entry in entries:
            self.answer(entry, P.result_error(entry.item_id, code, message), now)
