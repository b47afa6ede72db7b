"""The client registry: one record per connected client, by its socket identity.

A record holds what the router knows of a client beyond its items (those are the
ledger's): who it says it is (HELLO), its counts, and the results waiting to be
flushed to it this tick.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ClientRecord:
    identity: bytes
    first_seen: float
    last_seen: float
    name: str = ""
    host: str = ""
    pid: int | None = None
    done: int = 0
    failed: int = 0
    tokens: int = 0
    outbox: list[dict[str, Any]] = field(default_factory=list)  # results of this tick


class ClientRegistry:
    def __init__(self) -> None:
        self.by_identity: dict[bytes, ClientRecord] = {}
        self.pending_flush: set[bytes] = set()  # clients with results in their outbox

    def __iter__(self) -> Iterator[ClientRecord]:
        return iter(self.by_identity.values())

    def __len__(self) -> int:
        return len(self.by_identity)

    def get(self, identity: bytes) -> ClientRecord | None:
        return self.by_identity.get(identity)

    def seen(self, identity: bytes, now: float) -> ClientRecord:
        """The record of a client that just sent something (made on first sight)."""
        record = self.by_identity.get(identity)
        if record is None:
            record = self.by_identity[identity] = ClientRecord(identity, now, now)
        else:
            record.last_seen = now
        return record

    def queue_result(self, identity: bytes, result: dict[str, Any]) -> None:
        record = self.by_identity.get(identity)
        if record is None:
            record = self.by_identity[identity] = ClientRecord(identity, 0.0, 0.0)
        record.outbox.append(result)
        self.pending_flush.add(identity)
        if result.get("error") is None:
            record.done += 1
            record.tokens += int(result.get("completion_tokens") or 0)
        else:
            record.failed += 1

    def take_outboxes(self) -> list[tuple[ClientRecord, list[dict[str, Any]]]]:
        """Every client's results of this tick, each outbox emptied."""
        out = []
        for identity in self.pending_flush:
            record = self.by_identity.get(identity)
            if record is not None and record.outbox:
                out.append((record, record.outbox))
                record.outbox = []
        self.pending_flush.clear()
        return out

    def forget(self, identity: bytes) -> None:
        self.by_identity.pop(identity, None)
        self.pending_flush.discard(identity)
