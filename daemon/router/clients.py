"""The client registry: one record per client session, by its socket identity.

A record holds what the router knows of a client beyond its items (those are the
ledger's): who it says it is (HELLO), its counts, and the delivery state of its
results (docs/protocol.md, "The delivery contract"):

- Every RESULTS message gets the next ``seq`` and is *owed* until the client
  acknowledges it (ACK, cumulative). ``sent_upto`` is the last seq handed to ZMQ;
  what is above it waits for the pipe (full: EAGAIN) or for the client to come back
  (gone: EHOSTUNREACH). A resend request moves ``sent_upto`` back.
- ``unread_bytes``, what it owes, is what the unread budget limits.
- Lease: a client that cannot be reached (a probe or a send said EHOSTUNREACH) since
  ``disconnected_at`` and does not come back within the grace is expired by the
  router: its work cancelled, its record forgotten. ``session`` tells the client a
  forgotten record from its own.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

RATE_SAMPLE_S = 0.25  # tokens/s samples are taken at most this often


@dataclass(slots=True)
class ClientRecord:
    identity: bytes
    session: int
    first_seen: float
    last_seen: float
    name: str = ""
    host: str = ""
    pid: int | None = None
    user: str | None = None  # the CURVE public key (z85) it authenticated with, if any
    peer: str | None = None  # its address (TCP), when the router looks at it
    done: int = 0
    failed: int = 0
    tokens: int = 0
    new_results: list[dict[str, Any]] = field(default_factory=list)  # this tick's, unflushed
    seq: int = 0  # the last RESULTS seq given out
    sent_upto: int = 0  # the last seq handed to ZMQ
    acked: int = 0  # the client has every RESULTS up to this seq
    owed: OrderedDict[int, bytes] = field(default_factory=OrderedDict)  # seq -> body
    owed_items: dict[int, int] = field(default_factory=dict)  # seq -> results in it
    unread_bytes: int = 0
    reachable: bool = True
    disconnected_at: float | None = None
    over_budget: bool = False  # its unread results passed the unread budget
    unacked_since: float | None = None  # results handed to ZMQ and not acknowledged since
    pause_reason: str = ""  # why its items are not dispatched ("": they are; Delivery)
    rate: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def tokens_per_s(self, now: float, window_s: float = 10.0) -> float:
        samples = [s for s in self.rate if now - s[0] <= window_s]
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    @property
    def unread(self) -> int:
        return sum(self.owed_items.values())

    @property
    def unsent(self) -> bool:
        return self.sent_upto < self.seq

    def has_work(self, items: int) -> bool:
        """Whether the router holds anything for this client, given its ``items`` in
        the ledger (PONG's ``known``; a client with work is not forgotten)."""
        return bool(items or self.owed or self.new_results)


def who(record: ClientRecord) -> str:
    """A client as every log line and reply names it: its name, pid and id."""
    pid = f" pid {record.pid}" if record.pid else ""
    name = record.name or "unnamed"
    return f"{name}{pid} [{record.identity.hex()[:12]}]"


class ClientRegistry:
    def __init__(self) -> None:
        self.by_identity: dict[bytes, ClientRecord] = {}
        self.pending_flush: set[bytes] = set()  # clients with new results

    def __iter__(self) -> Iterator[ClientRecord]:
        return iter(self.by_identity.values())

    def __len__(self) -> int:
        return len(self.by_identity)

    def get(self, identity: bytes) -> ClientRecord | None:
        return self.by_identity.get(identity)

    def seen(self, identity: bytes, now: float) -> ClientRecord:
        """The record of a client that just sent something (made on first sight): it
        is reachable again, whatever a probe said before."""
        record = self.by_identity.get(identity)
        if record is None:
            record = self._new(identity, now)
        record.last_seen = now
        record.reachable = True
        record.disconnected_at = None
        return record

    def _new(self, identity: bytes, now: float) -> ClientRecord:
        session = secrets.randbits(53)  # exact in a msgpack int and a JSON number
        record = self.by_identity[identity] = ClientRecord(identity, session, now, now)
        return record

    def queue_result(self, identity: bytes, result: dict[str, Any], now: float) -> None:
        record = self.by_identity.get(identity)
        if record is None:
            record = self._new(identity, now)
        record.new_results.append(result)
        self.pending_flush.add(identity)
        if result.get("error") is None:
            record.done += 1
            record.tokens += int(result.get("completion_tokens") or 0)
            if not record.rate or now - record.rate[-1][0] >= RATE_SAMPLE_S:
                record.rate.append((now, record.tokens))
        else:
            record.failed += 1

    def take_new_results(self) -> list[tuple[ClientRecord, list[dict[str, Any]]]]:
        """Every client's results of this tick, taken from their records."""
        out = []
        for identity in self.pending_flush:
            record = self.by_identity.get(identity)
            if record is not None and record.new_results:
                out.append((record, record.new_results))
                record.new_results = []
        self.pending_flush.clear()
        return out

    # --- owed results ------------------------------------------------------------

    @staticmethod
    def owe(record: ClientRecord, body: bytes, items: int) -> int:
        """Keep one RESULTS body until acknowledged; its seq."""
        record.seq += 1
        record.owed[record.seq] = body
        record.owed_items[record.seq] = items
        record.unread_bytes += len(body)
        return record.seq

    @staticmethod
    def unsent(record: ClientRecord) -> Iterator[tuple[int, bytes]]:
        """(seq, body) of what is owed and not yet handed to ZMQ, in order."""
        for seq in range(record.sent_upto + 1, record.seq + 1):
            body = record.owed.get(seq)
            if body is not None:
                yield seq, body

    @staticmethod
    def acknowledge(record: ClientRecord, seq: int, resend: bool, now: float) -> None:
        """Everything up to ``seq`` arrived; with ``resend``, what is above it was lost."""
        seq = max(0, min(seq, record.seq))
        while record.owed:
            first = next(iter(record.owed))
            if first > seq:
                break
            record.unread_bytes -= len(record.owed.pop(first))
            record.owed_items.pop(first, None)
        record.acked = max(record.acked, seq)
        if resend:
            record.sent_upto = min(record.sent_upto, seq)
        # A partial ACK shows a live reader: the clock starts again for what it has
        # not acknowledged yet, and stops only when nothing sent is unacknowledged.
        record.unacked_since = None if record.acked >= record.sent_upto else now

    def forget(self, identity: bytes) -> None:
        self.by_identity.pop(identity, None)
        self.pending_flush.discard(identity)
