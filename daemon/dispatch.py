"""Dispatch: waiting items to workers, each kept near capacity + prefetch.

``policy.plan_dispatch`` decides how many items each serving slot takes (water-
filling by outstanding work per unit of capacity); the waiting room decides which
items (front, then priority tiers, clients round-robin). Items on probation run
one at a time on a slot drained for them (``isolating``), which takes no other work
until the probation lane is empty.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from exgen.daemon import policy, wire
from exgen.daemon.config import Settings
from exgen.daemon.fairqueue import FairQueue
from exgen.daemon.ledger import Ledger
from exgen.daemon.slots import Slot, SlotTable


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        backend: zmq.Socket[Any],
        ledger: Ledger,
        queue: FairQueue,
        table: SlotTable,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.ledger = ledger
        self.queue = queue
        self.table = table
        self.isolating: int | None = None  # the slot kept free for probation items

    def dispatch(self) -> None:
        serving = self.table.serving()
        if not serving:
            return
        self._dispatch_probation(serving)
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
            self._send_work(self.table.by_id[slot_id], self.queue.take(count))

    def slot_lost(self, slot_id: int) -> None:
        if self.isolating == slot_id:
            self.isolating = None

    def _dispatch_probation(self, serving: list[Slot]) -> None:
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
                self._send_work(slot, [key])

    def _send_work(self, slot: Slot, keys: list[int]) -> None:
        if not keys:
            return
        serving = slot.serving
        assert serving is not None
        now = time.monotonic()
        if not self.ledger.held_by(slot.id):
            serving.progress_at = now  # idle time is not a lack of progress
        rows = self.ledger.assign(keys, slot.id, now)
        self.backend.send_multipart([serving.identity, *wire.pack_work(rows)])
