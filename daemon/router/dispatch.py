"""Dispatch: waiting items to workers, each kept near capacity + prefetch; and back.

``policy.plan_dispatch`` decides how many items each serving slot takes (water-
filling by outstanding work per unit of capacity); the waiting room decides which
items (front, then priority tiers, clients round-robin). Items on probation run
one at a time on a slot drained for them (``isolating``), which takes no other work
until the probation lane is empty.

Items come back from the workers three ways: withdrawn (cancelled, timed out, their
client gone: the workers are told to drop them), taken back (their client is
unreachable: they wait again, unstarted) and orphaned (their worker died:
``Ledger.orphan_slot`` says which go back first and which go on probation).
"""

from __future__ import annotations

from exgen.daemon import policy
from exgen.daemon.net import wire
from exgen.daemon.router.ledger import Entry, Orphans
from exgen.daemon.router.rooms import Rooms
from exgen.daemon.supervisor.slots import Slot


class Dispatcher:
    def __init__(self, rooms: Rooms) -> None:
        self.settings = rooms.settings
        self.ledger = rooms.ledger
        self.queue = rooms.queue
        self.table = rooms.table
        self.outbox = rooms.outbox
        self.isolating: int | None = None  # the slot kept free for probation items

    def dispatch(self, now: float) -> None:
        serving = self.table.serving()
        if not serving:
            return
        self._dispatch_probation(serving, now)
        if self.queue.dispatchable == 0:
            return
        base = self.settings.prefetch
        loads = [
            slot.load(base, len(self.ledger.held_by(slot.id)))
            for slot in serving
            if slot.id != self.isolating
        ]
        plan = policy.plan_dispatch(loads, self.queue.dispatchable, base)
        for slot_id, count in plan.items():
            self._send_work(self.table.by_id[slot_id], self.queue.take(count), now)

    def _dispatch_probation(self, serving: list[Slot], now: float) -> None:
        """Items that shared two crashes run alone, on a worker drained for them."""
        if not self.queue.probation:
            self.isolating = None
            return
        slot = self.table.get(self.isolating) if self.isolating is not None else None
        if slot is None or slot.serving is None:
            slot = min(serving, key=lambda s: (len(self.ledger.held_by(s.id)), s.id))
            self.isolating = slot.id
        if not self.ledger.held_by(slot.id):
            key = self.queue.take_probation()
            if key is not None:
                self._send_work(slot, [key], now)

    def _send_work(self, slot: Slot, keys: list[int], now: float) -> None:
        if not keys:
            return
        serving = slot.serving
        assert serving is not None
        if not self.ledger.held_by(slot.id):
            serving.progress_at = now  # idle time is not a lack of progress
        rows = self.ledger.assign(keys, slot.id, now)
        self.outbox.worker(serving.identity, wire.pack_work(rows))

    # --- back from the workers ----------------------------------------------------------

    def withdraw(self, keys: set[int]) -> list[Entry]:
        """Take these keys out of the waiting room and off the workers (told to drop
        them); their entries are returned, still in the ledger, for the caller to
        finish, drop or requeue."""
        self.queue.remove(keys)
        self._cancel_on_workers(keys)
        return [self.ledger.entries[key] for key in keys if key in self.ledger.entries]

    def take_back(self, client: bytes) -> int:
        """A client's running items taken back from the workers (they drop them,
        nothing is answered); they wait again, unstarted, in its lane. How many."""
        running = self.ledger.running_keys_of(client)
        if running:
            self._cancel_on_workers(running)
            for entry in self.ledger.recall(running):
                self.queue.push(entry.client, entry.key, entry.budget, entry.tier)
        return len(running)

    def requeue(self, slot_id: int, orphans: Orphans) -> None:
        """A dead slot's items: back first, or on probation (the failed are answered
        by the caller)."""
        if self.isolating == slot_id:
            self.isolating = None
        for key in orphans.probation:
            self.queue.push_probation(key)
        self.queue.push_front(orphans.requeue)

    def _cancel_on_workers(self, keys: set[int]) -> None:
        """Tell each worker holding some of these keys to drop them."""
        by_slot: dict[int, list[int]] = {}
        for key in keys:
            holder = self.ledger.holder(key)
            if holder is not None:
                by_slot.setdefault(holder, []).append(key)
        for slot_id, slot_keys in by_slot.items():
            slot = self.table.get(slot_id)
            if slot is not None and slot.serving is not None:
                self.outbox.worker(slot.serving.identity, wire.pack_cancel(slot_keys))
