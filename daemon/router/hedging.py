"""Hedging the tail: an idle worker runs a second copy of a straggler (pure policy).

At the end of a job the waiting room is empty and the workers finish at different
times: a slower card, a busier batch, an item that drew long outputs. With ``hedge``
on, once nothing waits (nothing dispatchable, nothing on probation) each worker that
holds nothing takes, up to its capacity, copies of the oldest running items of the
other workers — the oldest first, because at the end of a job the items dispatched
longest ago are those of the slowest workers (a fast worker's last items went out
recently: it turned its work over faster). An item runs at most twice at once.

The first answer wins, a result or a per-item error alike (``Ledger.settle`` takes it
from either holder and forgets the entry); the router cancels the other copy on its
worker, and a late answer from it is dropped like any late answer. A holder that
dies leaves the item to the other copy (``Ledger.orphan_slot``), so neither crash
loses or duplicates an answer.

Items whose client streams tokens are never hedged: the two copies would stream the
same text twice, and after the first holder died the second's text would repeat what
the client already has. Streaming clients get the tail they had before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """A running item that may be copied: its key, its holder, when it went there."""

    key: int
    slot: int
    dispatched_at: float


def plan_hedges(
    idle: Sequence[tuple[int, int]], candidates: Sequence[Candidate]
) -> dict[int, list[int]]:
    """Which copies to start now: idle slot → keys.

    ``idle``: (slot, capacity) of each worker that holds nothing; ``candidates``:
    running items not yet hedged (never a streaming one). The oldest go first, dealt
    to the idle slot with the most room left (so two idle workers share the tail), each slot up to
    its capacity; a slot never gets a copy of its own item (it holds nothing).
    """
    if not idle or not candidates:
        return {}
    room = {slot: capacity for slot, capacity in idle}
    order = sorted(candidates, key=lambda c: (c.dispatched_at, c.key))
    plan: dict[int, list[int]] = {}
    for item in order:
        open_slots = [s for s, left in room.items() if left > 0 and s != item.slot]
        if not open_slots:
            if not any(room.values()):
                break
            continue
        slot = max(open_slots, key=lambda s: (room[s], -s))  # the most room, then lowest
        plan.setdefault(slot, []).append(item.key)
        room[slot] -= 1
    return plan
