"""Dispatch: waiting items to workers, each kept near capacity + prefetch; and back.

How many items a slot may hold is ``policy.room`` (capacity + prefetch). Which go
where, with ``placement`` "prefix" or "cost" (the default is "prefix"): the waiting
room hands a bounded batch of items, in its fair order (front, then priority tiers,
clients round-robin), to its staging area, grouped by prefix key, and
``placement.plan_placement`` places them — each prefix with the workers that hold it
within a bounded imbalance, the rest by estimated work (uncached prompt tokens +
max_new_tokens). With "count", ``policy.plan_dispatch`` decides how many items each
serving slot takes (water-filling by item count per unit of capacity) and the waiting
room which. Items on probation run
one at a time on a slot drained for them (``isolating``), which takes no other work
until the probation lane is empty. With ``hedge`` on, once nothing waits, a worker
that holds nothing takes copies of the oldest running items of the others
(``hedging.plan_hedges``; ``Ledger.hedge``).

Items come back from the workers three ways: withdrawn (cancelled, timed out, their
client gone: the workers are told to drop them), taken back (their client is
unreachable: they wait again, unstarted) and orphaned (their worker died:
``Ledger.orphan_slot`` says which go back first and which go on probation).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from typing import overload

from exgen.daemon import policy
from exgen.daemon.net import wire
from exgen.daemon.router.fairqueue import Group
from exgen.daemon.router.hedging import Candidate, plan_hedges
from exgen.daemon.router.ledger import Entry, Ledger, Orphans
from exgen.daemon.router.placement import Affinity, SlotState, Waiting, plan_placement
from exgen.daemon.router.rooms import Rooms
from exgen.daemon.supervisor.slots import Slot

logger = logging.getLogger("exgen.dispatch")

# Items staged for placement: this many times what the serving workers may hold
# (capacity + prefetch, summed), at least STAGE_MIN. Enough to find each worker items
# of the prefixes it holds; few enough that a new client's items wait behind at most
# about two rounds of the workers' room.
STAGE_ROUNDS = 2
STAGE_MIN = 64


def _tier(group: tuple[Group, object]) -> int:
    return group[0][0]


class StagedItems(Sequence[Waiting]):
    """A staged group as ``plan_placement`` reads it: built item by item on demand."""

    def __init__(self, keys: Sequence[int], ledger: Ledger, affinity: Affinity) -> None:
        self.keys = keys
        self.entries = ledger.entries
        self.affinity = affinity

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Waiting: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Waiting]: ...
    def __getitem__(self, index: int | slice) -> Waiting | Sequence[Waiting]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        entry = self.entries[self.keys[index]]
        if entry.prefix is None:
            return Waiting(entry.key, entry.tokens, 0, entry.budget)
        shared = self.affinity.shared(entry.prefix, entry.shared)
        return Waiting(entry.key, entry.tokens, shared, entry.budget)


class Dispatcher:
    def __init__(self, rooms: Rooms) -> None:
        self.settings = rooms.settings
        self.ledger = rooms.ledger
        self.queue = rooms.queue
        self.table = rooms.table
        self.outbox = rooms.outbox
        self.isolating: int | None = None  # the slot kept free for probation items
        self.placing = self.settings.placement != "count"
        self.affinity = Affinity()
        self.keyless_path = True  # False: always the staging area (tests compare the two)
        self.hedging = self.settings.hedge
        # Items left waiting by the last dispatch: a worker it left idle (affinity keeps
        # it for a prefix's holders) is not starving until more items arrive.
        self.waiting_after_dispatch = 0

    def dispatch(self, now: float) -> None:
        self._dispatch(now)
        self.waiting_after_dispatch = self.queue.dispatchable

    def _dispatch(self, now: float) -> None:
        serving = self.table.serving()
        if not serving:
            return
        self._dispatch_probation(serving, now)
        if self.queue.dispatchable == 0:
            if self.hedging and not self.queue.size:
                self._hedge(serving, now)
            return
        if self.placing:
            self._place(serving, now)
            return
        base, spare = self.settings.prefetch, self._spare(serving)
        loads = [self._load(slot, spare) for slot in serving if slot.id != self.isolating]
        plan = policy.plan_dispatch(loads, self.queue.dispatchable, base)
        for slot_id, count in plan.items():
            self._send_work(self.table.by_id[slot_id], self.queue.take(count), now)

    def _load(self, slot: Slot, spare: int) -> policy.WorkerLoad:
        """A serving slot's load: what it holds, its capacity and its prefetch."""
        return slot.load(self.settings.prefetch, len(self.ledger.held_by(slot.id)), spare)

    def _spare(self, serving: list[Slot]) -> int:
        """Waiting items past what every serving worker can run at once: where a
        prefetch past the base may come from (``policy.prefetch_for``)."""
        running = sum(slot.serving.capacity for slot in serving if slot.serving is not None)
        return max(0, self.queue.dispatchable - running)

    def starving(self) -> bool:
        """Items arrived since the last dispatch while a serving worker holds none (the
        slot kept for probation items aside): a dispatch now would start work that
        reading on would delay. Not for items the last dispatch left waiting on
        purpose: with a worker idle for affinity's sake, reading stopped after every
        client message, and PINGs were answered at 15,000/s instead of 37,000-50,000."""
        if self.queue.dispatchable <= self.waiting_after_dispatch:
            return False
        held = self.ledger.held
        return any(
            slot.id != self.isolating and not held.get(slot.id) for slot in self.table.serving()
        )

    def _place(self, serving: list[Slot], now: float) -> None:
        """Staged items to the workers with room (``placement.plan_placement``)."""
        base, ledger = self.settings.prefetch, self.ledger
        if self.keyless_path and not ledger.keyed and not self.queue.staged:
            self._place_keyless(serving, now)
            return
        states = []
        limit = 0
        spare = self._spare(serving)
        for slot in serving:
            if slot.id == self.isolating:
                continue
            load = self._load(slot, spare)
            room = policy.room(load, base)
            limit += load.outstanding + room  # capacity + prefetch, or what it holds
            cost = ledger.held_cost.get(slot.id, 0)
            states.append(SlotState(slot.id, load.outstanding, load.capacity, room, cost))
        if not any(state.room for state in states):
            return
        self._stage(max(STAGE_MIN, STAGE_ROUNDS * limit))
        queue = self.queue
        groups = [
            (prefix, StagedItems(keys, ledger, self.affinity))
            for (_, prefix), keys in sorted(queue.staged.items(), key=_tier)
        ]
        everything_staged = queue.dispatchable <= queue.staged_count
        slack = self.settings.affinity_slack
        plan = plan_placement(states, groups, self.affinity.holders, slack, everything_staged)
        sent: set[int] = set()
        for slot_id, placed in plan.items():
            keys = [key for key, _ in placed]
            sent.update(keys)
            self._note_holds(slot_id, keys)
            self._send_work(self.table.by_id[slot_id], keys, now, [c for _, c in placed])
        for name in list(queue.staged):
            queue.unstage(name, sent)

    def _place_keyless(self, serving: list[Slot], now: float) -> None:
        """``plan_placement`` where no open entry has a prefix key, nothing staged: the
        same decisions without the staging area. Every staged group would be (tier,
        None), in ``take``'s order, and water-filled by cost one item at a time to the
        least cost-loaded slot with room; so take as many items as there is room and
        water-fill them here. Saves the router 2–4 µs a prompt (bench/RESULTS.md)."""
        base, held_cost = self.settings.prefetch, self.ledger.held_cost
        room: dict[int, int] = {}
        capacity: dict[int, int] = {}
        cost: dict[int, int] = {}
        heap: list[tuple[float, int]] = []
        spare = self._spare(serving)
        for slot in serving:
            load = self._load(slot, spare)
            free = policy.room(load, base)
            if free and slot.id != self.isolating:
                room[slot.id], capacity[slot.id] = free, load.capacity
                cost[slot.id] = held_cost.get(slot.id, 0)
                heap.append((cost[slot.id] / load.capacity, slot.id))
        heapq.heapify(heap)
        entries = self.ledger.entries
        plan: dict[int, tuple[list[int], list[int]]] = {}
        for key in self.queue.take(sum(room.values())):
            least = heap[0][1]
            entry = entries[key]
            item = entry.tokens + entry.budget  # placement.item_cost, nothing cached
            keys, costs = plan.setdefault(least, ([], []))
            keys.append(key)
            costs.append(item)
            cost[least] += item
            room[least] -= 1
            if room[least]:
                heapq.heapreplace(heap, (cost[least] / capacity[least], least))
            else:
                heapq.heappop(heap)
        for slot_id, (keys, costs) in plan.items():
            self._send_work(self.table.by_id[slot_id], keys, now, costs)

    def _hedge(self, serving: list[Slot], now: float) -> None:
        """Nothing waits: idle workers take copies of the oldest running items
        (hedging.plan_hedges; the first answer wins, WorkerMessages cancels the other)."""
        ledger = self.ledger
        idle = [
            (slot.id, slot.serving.capacity)
            for slot in serving
            if slot.serving is not None and not ledger.held_by(slot.id)
        ]
        if not idle or not ledger.held:
            return
        entries = ledger.entries
        candidates = [
            Candidate(key, slot_id, entry.dispatched_at or 0.0)
            for slot_id, keys in ledger.held.items()
            for key in keys
            if (entry := entries[key]).twin is None
            and entry.slot == slot_id
            and not wire.job_streams(entry.job)
        ]
        for slot_id, keys in plan_hedges(idle, candidates).items():
            slot = self.table.by_id[slot_id]
            assert slot.serving is not None
            slot.serving.progress_at = now  # idle time is not a lack of progress
            rows = [ledger.hedge(key, slot_id) for key in keys]
            self.outbox.worker(slot.serving.identity, wire.pack_work(rows))
            logger.info("slot %d: hedging %d running items of other workers", slot_id, len(keys))

    def _stage(self, target: int) -> None:
        """Top the staging area up to ``target`` items, from the waiting room."""
        queue = self.queue
        wanted = min(target - queue.staged_count, queue.dispatchable - queue.staged_count)
        if wanted > 0:
            entries = self.ledger.entries
            queue.stage(wanted, lambda key: (entries[key].tier, entries[key].prefix))

    def _note_holds(self, slot_id: int, keys: list[int]) -> None:
        entries, hold = self.ledger.entries, self.affinity.hold
        last = None
        for key in keys:
            prefix = entries[key].prefix
            if prefix is not None and prefix != last:
                hold(slot_id, prefix)
                last = prefix

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

    def _send_work(
        self, slot: Slot, keys: list[int], now: float, costs: list[int] | None = None
    ) -> None:
        if not keys:
            return
        serving = slot.serving
        assert serving is not None
        if not self.ledger.held_by(slot.id):
            serving.progress_at = now  # idle time is not a lack of progress
        rows = self.ledger.assign(keys, slot.id, now, costs)
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
        self.affinity.forget_slot(slot_id)  # its successor starts with an empty cache
        for key in orphans.probation:
            self.queue.push_probation(key)
        self.queue.push_front(orphans.requeue)

    def _cancel_on_workers(self, keys: set[int]) -> None:
        """Tell each worker holding some of these keys to drop them."""
        by_slot: dict[int, list[int]] = {}
        for key in keys:
            for holder in self.ledger.holders(key):  # two when hedged
                by_slot.setdefault(holder, []).append(key)
        for slot_id, slot_keys in by_slot.items():
            slot = self.table.get(slot_id)
            if slot is not None and slot.serving is not None:
                self.outbox.worker(slot.serving.identity, wire.pack_cancel(slot_keys))
