"""The ledger: every accepted item, from acceptance until its one answer.

It is the one source of truth for *who holds what*: an entry's ``slot`` is the slot
whose worker runs it (None while it waits), and ``held`` indexes the same facts by
slot. A worker's answer settles an entry only if the ledger says that slot holds it,
so a late result from a worker already given up for dead can never make a duplicate.

Hedging (``hedge``): a running entry may run a second time on another slot, its
``twin``; both slots hold it (``held``), either's answer settles it (the first; the
entry is forgotten, so the other's is dropped as late) and the caller cancels the
other copy. A twin that dies is just dropped; a holder that dies while its twin runs
hands the entry to the twin (``orphan_slot``): it is never requeued while a copy runs.

Blame: only a death that could have been caused by the work counts towards an
item's attempts. An item that shared two crashes goes on probation (it runs alone);
it fails only when its attempts are used up *and* it ran alone when the last one
came (``policy.poison_verdict``), so the items that merely shared a poison prompt's
batch are never failed with it.

No sockets, no clocks (``now`` is passed in): tested in-process, with hypothesis.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from exgen.daemon import policy

# What an entry costs the router beyond its row's bytes (the Entry, its id, the
# client-id index), measured with tracemalloc on 100,000 accepted items: 392 (360
# before the four placement fields; an item with a prefix key holds its own int too,
# about 32 bytes more, not counted), plus 8 for hedging's ``twin`` (an Entry is 176
# bytes by sys.getsizeof, 168 before it).
ENTRY_OVERHEAD_BYTES = 400


@dataclass(slots=True)
class Entry:
    key: int
    client: bytes
    item_id: str
    job: bytes  # the encoded WORK row (wire.encode_job)
    accepted_at: float
    budget: int  # max_new_tokens: the waiting room's order
    tier: int = 0  # protocol.PRIORITIES index
    deadline: float | None = None  # accepted_at + timeout_s
    attempts: int = 0
    slot: int | None = None  # the slot whose worker holds it; None: waiting
    dispatched_at: float | None = None  # when it last went to a worker
    causes: list[str] | None = None  # why the workers it was on died (poison verdicts)
    nbytes: int = 0  # what it costs the router: its row, its id, the entry (at accept)
    # Placement (placement.py): the prefix proxy, estimated prompt tokens and the part
    # of them the key covers; ``cost``: its estimated work on the slot holding it.
    prefix: int | None = None
    tokens: int = 0
    shared: int = 0
    cost: int = 0
    twin: int | None = None  # a slot running a second copy (hedging); None: none


@dataclass(slots=True)
class Orphans:
    """What a dead worker's items became: back in line, on probation, or failed."""

    requeue: list[int] = field(default_factory=list)
    probation: list[int] = field(default_factory=list)
    failed: list[Entry] = field(default_factory=list)


class Ledger:
    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.by_client_id: dict[tuple[bytes, str], int] = {}
        self.held: dict[int, set[int]] = {}  # slot -> keys its worker runs
        self.held_cost: dict[int, int] = {}  # slot -> the estimated work of those keys
        # Entries per client, counted (has a client work here?); which keys they are is
        # asked rarely (a client gone, cancel all) and found by a scan.
        self.per_client: dict[bytes, int] = {}
        self.next_key = 0
        self.completed = 0
        self.failed = 0
        self.abandoned = 0  # cancelled because their client went away (no one to answer)
        self.nbytes = 0  # rows and entries of everything accepted and not answered
        self.keyed = 0  # open entries with a prefix key (none: placement's keyless path)
        self.hedges = 0  # second copies sent (hedging)
        self.hedge_wins = 0  # answers that came from the second copy first

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def inflight(self) -> int:
        return sum(len(keys) for keys in self.held.values())

    def knows(self, client: bytes, item_id: str) -> bool:
        return (client, item_id) in self.by_client_id

    def key_of(self, client: bytes, item_id: str) -> int | None:
        return self.by_client_id.get((client, item_id))

    def keys_of(self, client: bytes) -> set[int]:
        if client not in self.per_client:
            return set()
        return {key for key, entry in self.entries.items() if entry.client == client}

    def running_keys_of(self, client: bytes) -> set[int]:
        """The client's keys a worker holds now (waiting ones left out): a look at
        what is in flight, not a scan of every entry."""
        if client not in self.per_client:
            return set()
        entries = self.entries
        return {k for keys in self.held.values() for k in keys if entries[k].client == client}

    def count_of(self, client: bytes) -> int:
        return self.per_client.get(client, 0)

    def accept(
        self, client: bytes, item_id: str, job: bytes, now: float, budget: int, tier: int = 0
    ) -> Entry:
        """A new entry; ``job`` is the encoded row and must carry the returned key."""
        nbytes = len(job) + len(item_id) + ENTRY_OVERHEAD_BYTES
        entry = Entry(self.next_key, client, item_id, job, now, budget, tier, nbytes=nbytes)
        self.next_key += 1
        self.entries[entry.key] = entry
        self.by_client_id[(client, item_id)] = entry.key
        self.per_client[client] = self.per_client.get(client, 0) + 1
        self.nbytes += nbytes
        return entry

    def note_prompt(self, entry: Entry, prefix: int | None, tokens: int, shared: int) -> None:
        """What placement worked out about the entry's prompt (placement.prompt_facts)."""
        if prefix is not None and entry.prefix is None:
            self.keyed += 1
        entry.prefix, entry.tokens, entry.shared = prefix, tokens, shared

    def reserve_key(self) -> int:
        """The key the next ``accept`` will use (the row is encoded with it first)."""
        return self.next_key

    def assign(
        self, keys: list[int], slot: int, now: float, costs: list[int] | None = None
    ) -> list[bytes]:
        """These waiting keys now run on ``slot``: their rows, for the WORK message.
        ``costs``: each one's estimated work there (None: its budget)."""
        held = self.held.setdefault(slot, set())
        rows = []
        added = 0
        for i, key in enumerate(keys):
            entry = self.entries[key]
            entry.slot = slot
            entry.dispatched_at = now
            entry.cost = entry.budget if costs is None else costs[i]
            added += entry.cost
            held.add(key)
            rows.append(entry.job)
        self.held_cost[slot] = self.held_cost.get(slot, 0) + added
        return rows

    def hedge(self, key: int, slot: int) -> bytes:
        """The running entry runs a second time on ``slot`` (its twin): its row."""
        entry = self.entries[key]
        assert entry.slot is not None and entry.slot != slot and entry.twin is None
        entry.twin = slot
        self.held.setdefault(slot, set()).add(key)
        self.held_cost[slot] = self.held_cost.get(slot, 0) + entry.cost
        self.hedges += 1
        return entry.job

    def holders(self, key: int) -> list[int]:
        """The slots running the entry: none, one, or two when hedged."""
        entry = self.entries.get(key)
        if entry is None or entry.slot is None:
            return []
        return [entry.slot] if entry.twin is None else [entry.slot, entry.twin]

    def _unhold(self, entry: Entry) -> None:
        """The entry leaves its slots' hands (answered, recalled, orphaned)."""
        if entry.twin is not None:
            self._drop_copy(entry, entry.twin)
            entry.twin = None
        if entry.slot is not None:
            self._drop_copy(entry, entry.slot)
            entry.slot = None

    def _drop_copy(self, entry: Entry, slot: int) -> None:
        held = self.held.get(slot)  # once per answer: no throwaway set for a slot with none
        if held is not None:
            held.discard(entry.key)
        self.held_cost[slot] = self.held_cost.get(slot, 0) - entry.cost

    def held_by(self, slot: int) -> set[int]:
        return self.held.get(slot, set())

    def holder(self, key: int) -> int | None:
        entry = self.entries.get(key)
        return entry.slot if entry is not None else None

    def settle(self, key: int, slot: int, ok: bool) -> Entry | None:
        """The entry ``slot``'s answer settles, counted and forgotten; else None."""
        entry = self.entries.get(key)
        if entry is None or (entry.slot != slot and entry.twin != slot):
            return None  # cancelled, answered by its other copy, or a late result from
            #              a worker given up for dead
        if entry.twin == slot:
            self.hedge_wins += 1
        self.forget(entry)
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        return entry

    def finish(self, keys: Iterable[int]) -> list[Entry]:
        """Entries answered by the router itself (cancel, deadline, poison): forgotten,
        counted as failed. Returns those that were still open."""
        out = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None:
                self.forget(entry)
                self.failed += 1
                out.append(entry)
        return out

    def refused(self) -> None:
        """An item answered with an error at the door, never accepted: counted failed."""
        self.failed += 1

    def abandon(self, keys: Iterable[int]) -> list[Entry]:
        """Entries cancelled because their client went away: dropped, counted apart."""
        out = self.drop(keys)
        self.abandoned += len(out)
        return out

    def drop(self, keys: Iterable[int]) -> list[Entry]:
        """Entries nobody will be answered for (their client is gone; a handed-back
        item): forgotten, not counted."""
        out = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None:
                self.forget(entry)
                out.append(entry)
        return out

    def forget(self, entry: Entry) -> None:
        del self.entries[entry.key]
        self.by_client_id.pop((entry.client, entry.item_id), None)
        left = self.per_client[entry.client] - 1
        if left:
            self.per_client[entry.client] = left
        else:
            del self.per_client[entry.client]
        self._unhold(entry)
        self.nbytes -= entry.nbytes
        if entry.prefix is not None:
            self.keyed -= 1

    def recall(self, keys: Iterable[int]) -> list[Entry]:
        """Running entries taken back unanswered (their client is unreachable): waiting
        again, no attempt counted. Returns those that were running."""
        out = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None or entry.slot is None:
                continue
            self._unhold(entry)
            out.append(entry)
        return out

    def orphan_slot(
        self, slot: int, crashed: bool, blames_work: bool, max_attempts: int, cause: str
    ) -> Orphans:
        """A slot's worker is gone: each item it held is requeued, put on probation or
        failed as poison (failed entries are forgotten; the caller answers them)."""
        keys = sorted(self.held.pop(slot, set()))
        self.held_cost.pop(slot, None)
        out = Orphans()
        alone = len(keys) == 1
        for key in keys:
            entry = self.entries[key]
            if entry.twin is not None:
                self._twin_lost(entry, slot)  # its other copy runs on: nothing to do
                continue
            entry.slot = None
            if crashed and blames_work:
                entry.attempts += 1
                entry.causes = [*(entry.causes or ()), cause]
            verdict = policy.poison_verdict(entry.attempts, max_attempts, alone)
            if verdict == policy.FAIL:
                self.forget(entry)
                self.failed += 1
                out.failed.append(entry)
            elif verdict == policy.PROBATION:
                out.probation.append(key)
            else:
                out.requeue.append(key)
        return out

    @staticmethod
    def _twin_lost(entry: Entry, slot: int) -> None:
        """One of a hedged entry's two holders died: the other holds it alone. No
        attempt is counted (a poison prompt crashes the other too, and is blamed
        then)."""
        if entry.slot == slot:
            entry.slot = entry.twin
        entry.twin = None


class Deadlines:
    """Entries with a ``timeout_s``, soonest first (a heap of (deadline, key))."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int]] = []

    def add(self, entry: Entry, timeout_s: float) -> None:
        entry.deadline = entry.accepted_at + timeout_s
        heapq.heappush(self.heap, (entry.deadline, entry.key))

    def past(self, now: float, ledger: Ledger) -> list[Entry]:
        """The open entries whose deadline has passed (answered ones are skipped)."""
        out = []
        while self.heap and self.heap[0][0] <= now:
            deadline, key = heapq.heappop(self.heap)
            entry = ledger.entries.get(key)
            if entry is not None and entry.deadline == deadline:
                out.append(entry)
        return out
