"""Placement by shared prefix and by cost: pure functions, plus the router's memory of
which worker holds which prefix.

**The prefix proxy** (``prefix_key``). The router never tokenizes and never renders a
chat template, so it cannot see the engine's token blocks. It keys an item by a hash
of the first ``key_bytes`` bytes of its prompt as sent:

- chat ``messages``: the messages, each encoded on its own (msgpack) and joined, cut
  at ``key_bytes`` — but never past the start of the last message when the messages
  before it (the conversation head: the system prompt, few-shot turns) hold at least
  ``MIN_HEAD_BYTES``. Equal heads render to equal template prefixes, so items that
  share a head share the KV a prefix cache keeps, whatever their last turns say;
- a text ``prompt``: its first ``key_bytes`` UTF-8 bytes; token ids: the first
  ``key_bytes // 4`` ids (a token is about four bytes of English text);
- shorter than that: no key (no affinity; such a prompt has little to share).

Why bytes of the input and not tokens: it costs one hash of at most ``key_bytes``
bytes at admission (about a microsecond), needs no tokenizer in the router, and
equal input heads give equal rendered heads for every template we ship. A key stands
for the first ``key_bytes`` bytes only: prompts that share more than that still share
one key, and prompts that share less than that get different keys (no affinity lost
that a cache could have paid much for: at most ``key_bytes`` bytes of prefill).

**Cost** (``item_cost``): an item's work is its prompt tokens not expected to be
cached on the worker it goes to, plus its ``max_new_tokens``. Prompt tokens are
estimated as bytes ÷ 4 (ids: counted); the part expected cached, on a worker that
holds the item's prefix, is what that prefix's results reported cached lately
(``Affinity.learn``), or at first the key's bytes ÷ 4.

**The plan** (``plan_placement``): the items waiting in the router's staging area
(``FairQueue.staged``: taken from the waiting room in its fair order, grouped by
key) go to workers with room (``policy.room``: capacity + prefetch, as before):

1. a group whose prefix some workers hold goes to them, least cost-loaded first;
2. a group no worker holds goes, whole, to the least cost-loaded worker with room
   (so a job's distinct prefixes spread over the workers, one each while they last);
   items without a key are water-filled by cost, one at a time;
3. a worker still below its capacity takes a prefix it does not hold (it becomes one
   of its holders) only from the group with the most waiting items per holder, and
   only when that group's backlog — its waiting items and what its holders hold past
   their capacity (their prefetch, which waits as the group does) — is more than
   ``slack`` × its holders' capacity: less than that, the holders start it all as their
   running items end. Without the prefetch in the count, 18 items of a new prefix at
   capacity 8 went 10 to one worker (8, and 2 of prefetch) and 8 waited for it, within
   one batch of it, while the other worker sat idle: three batches on one worker where
   two workers take one each (and a prefill);
4. the last batch: once every waiting item is staged (``last_batch``), a group with two
   or more holders whose waiting items fit in one batch of them (its holders'
   capacity, summed) fills its holders to capacity only, not into their prefetch.
   An item in a worker's prefetch waits there for one of that worker's running items
   to end, and at the end of a job that is often a batch of its own: items of equal
   length start and end together (continuous batching in lockstep), so two items
   prefetched each to four holders made four extra batches where one would do. Left
   in the staging area, the item goes to whichever holder frees a slot first.
   Measured (``bench/prefix_placement.py``, 32 simulated GPUs, 4 holders a prefix):
   the workers' last results spread over 0.22 s without it (a batch is 0.16-0.19 s),
   over 0.07 s with it; makespan ÷ ideal 1.106 without, 1.076 with (medians of 9
   rounds each, run alternately on 2 shared cores).

The bounded imbalance: affinity never keeps an item from a worker below capacity
while its prefix's holders have more than ``slack`` × their capacity of it waiting,
in the router or in their prefetch.
So a worker idles for affinity's sake at most while the holders run through one
batch (``slack`` of 1: about one item's generation time at the end of a job), and
never while work with no holder, or without a key, waits. The last batch keeps no
item from a worker below capacity: it withholds prefetch only, which hides the
router's reply time (a message, milliseconds) and costs it once per holder at a
prefix's end.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

MIN_HEAD_BYTES = 128  # a conversation head this long keys by itself (two cache blocks)
BYTES_PER_TOKEN = 4  # prompt bytes per token, for estimates only
HELD_PREFIXES_PER_SLOT = 256  # the prefixes a worker is remembered holding, LRU
LEARNED_PREFIXES = 4096  # the prefixes whose cached length is remembered, LRU

_encode = msgspec.msgpack.Encoder().encode
_blake2b = hashlib.blake2b


@dataclass(slots=True)  # not frozen: one per accepted item, and frozen costs 3x (0.4 µs)
class PromptFacts:
    """What admission works out about an item's prompt, once."""

    key: int | None  # the prefix proxy; None: no affinity
    tokens: int  # estimated prompt tokens
    shared: int  # estimated tokens covered by the key (cached on a holder, at first)


def prompt_facts(prompt: Any, messages: Any, key_bytes: int) -> PromptFacts:
    """The prefix key and the token estimates of one validated item."""
    if messages is not None:
        parts = [_encode(m) for m in messages]
        data = b"".join(parts)
        head = len(data) - len(parts[-1]) if parts else 0
        cut = min(key_bytes, head) if head >= MIN_HEAD_BYTES else key_bytes
        return _facts(data, cut, len(data) // BYTES_PER_TOKEN, key_bytes)
    if isinstance(prompt, list):
        ids = key_bytes // BYTES_PER_TOKEN
        if key_bytes <= 0 or len(prompt) < ids:
            return PromptFacts(None, len(prompt), 0)
        return PromptFacts(_hash(_encode(prompt[:ids])), len(prompt), ids)
    text = prompt or ""
    if len(text) < keyless_text_chars(key_bytes):
        return PromptFacts(None, len(text) // BYTES_PER_TOKEN, 0)
    data = text.encode()
    return _facts(data, key_bytes, len(data) // BYTES_PER_TOKEN, key_bytes)


def keyless_text_chars(key_bytes: int) -> int:
    """A text prompt of fewer characters has no key: too short to fill ``key_bytes``
    even in 4-byte characters (most prompts of a throughput job; admission checks this
    before ``prompt_facts``)."""
    return -(-key_bytes // 4)


def _facts(data: bytes, cut: int, tokens: int, key_bytes: int) -> PromptFacts:
    if key_bytes <= 0 or cut <= 0 or len(data) < cut:
        return PromptFacts(None, tokens, 0)
    return PromptFacts(_hash(data[:cut]), tokens, cut // BYTES_PER_TOKEN)


def _hash(data: bytes) -> int:
    return int.from_bytes(_blake2b(data, digest_size=8).digest(), "little")


def item_cost(tokens: int, cached: int, max_new_tokens: int) -> int:
    """An item's estimated work on a worker: uncached prompt tokens + its budget."""
    return max(0, tokens - cached) + max_new_tokens


# --- the plan (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotState:
    """A serving worker as placement sees it."""

    slot: int
    outstanding: int  # items it holds
    capacity: int
    room: int  # items it may still take (policy.room)
    cost: int  # estimated work it holds (item_cost of each, summed)


@dataclass(frozen=True, slots=True)
class Waiting:
    """One staged item: its ledger key and what placement needs of it."""

    key: int
    tokens: int
    shared: int
    budget: int


def plan_placement(
    slots: Sequence[SlotState],
    groups: Sequence[tuple[int | None, Sequence[Waiting]]],
    holders: Mapping[int, set[int]],
    slack: float,
    last_batch: bool = False,
) -> dict[int, list[tuple[int, int]]]:
    """Which staged items go to which slot now: slot → [(ledger key, its cost)].

    ``groups``: staged items as (prefix key or None, items in their fair order), the
    groups of higher priority first (a prefix may have a group in each tier);
    ``holders``: the slots known to hold each prefix; ``last_batch``: every waiting
    item is in ``groups`` (none left unstaged), so a small group is a prefix's last.
    Nothing is mutated; see the module's docstring for the rules.
    """
    plan = _Plan(slots, last_batch)
    for index, (prefix, items) in enumerate(groups):
        if prefix is None:
            plan.water_fill(index, items)
        else:
            plan.place_group(index, prefix, items, holders)
    if any(prefix is not None for prefix, _ in groups):
        plan.steal(groups, holders, slack)
    return plan.out


class _Plan:
    def __init__(self, slots: Sequence[SlotState], last_batch: bool = False) -> None:
        self.last_batch = last_batch
        self.room = {s.slot: s.room for s in slots}
        self.capacity = {s.slot: s.capacity for s in slots}
        self.outstanding = {s.slot: s.outstanding for s in slots}
        self.cost = {s.slot: s.cost for s in slots}
        self.taken: dict[int, int] = {}  # items planned out of each group (by index)
        self.new_holders: dict[int, set[int]] = {}
        self.out: dict[int, list[tuple[int, int]]] = {}

    def load(self, slot: int) -> tuple[float, int]:
        return (self.cost[slot] / self.capacity[slot], slot)

    def open_slots(self) -> list[int]:
        return [s for s, r in self.room.items() if r > 0]

    def give(self, slot: int, item: Waiting, cached: bool) -> None:
        cost = item_cost(item.tokens, item.shared if cached else 0, item.budget)
        self.out.setdefault(slot, []).append((item.key, cost))
        self.room[slot] -= 1
        self.outstanding[slot] += 1
        self.cost[slot] += cost

    def water_fill(self, group: int, items: Sequence[Waiting]) -> None:
        """Keyless items, one at a time, to the least cost-loaded slot with room."""
        index = self.taken.get(group, 0)
        heap = [self.load(slot) for slot in self.open_slots()]
        heapq.heapify(heap)
        while index < len(items) and heap:
            slot = heap[0][1]
            self.give(slot, items[index], cached=False)
            index += 1
            if self.room[slot]:
                heapq.heapreplace(heap, self.load(slot))
            else:
                heapq.heappop(heap)
        self.taken[group] = index

    def place_group(
        self, group: int, prefix: int, items: Sequence[Waiting], holders: Mapping[int, set[int]]
    ) -> None:
        held = [s for s in self._holders(prefix, holders) if s in self.room]
        if not held:
            open_slots = self.open_slots()
            if not open_slots:
                return
            home = min(open_slots, key=self.load)
            self.new_holders.setdefault(prefix, set()).add(home)
            held = [home]
        self._fill(group, items, held, not self.is_last_batch(held, group, items))

    def is_last_batch(self, held: Collection[int], group: int, items: Sequence[Waiting]) -> bool:
        """Whether a group's items not yet given are its prefix's last batch (rule 4):
        all of it staged, fitting in one batch of two or more holders. One holder gains
        nothing by it: the items would wait for the same worker, later."""
        if not self.last_batch or len(held) < 2:
            return False
        return len(items) - self.taken.get(group, 0) <= sum(self.capacity[s] for s in held)

    def has_room(self, slot: int, prefetch: bool) -> bool:
        if prefetch:
            return self.room[slot] > 0
        return self.room[slot] > 0 and self.outstanding[slot] < self.capacity[slot]

    def _fill(
        self, group: int, items: Sequence[Waiting], held: Collection[int], prefetch: bool = True
    ) -> None:
        """The group's items to these holders, each to the least loaded with room
        (without ``prefetch``: only to those below capacity, up to it)."""
        index = self.taken.get(group, 0)
        while index < len(items):
            open_held = [s for s in held if self.has_room(s, prefetch)]
            if not open_held:
                break
            self.give(min(open_held, key=self.load), items[index], cached=True)
            index += 1
        self.taken[group] = index

    def steal(
        self,
        groups: Sequence[tuple[int | None, Sequence[Waiting]]],
        holders: Mapping[int, set[int]],
        slack: float,
    ) -> None:
        """Slots below capacity take up the group most behind, past ``slack``."""
        hungry = sorted(
            (s for s in self.open_slots() if self.outstanding[s] < self.capacity[s]),
            key=self.load,
        )
        for slot in hungry:
            best: tuple[float, int, int] | None = None
            for index, (prefix, items) in enumerate(groups):
                if prefix is None:
                    continue
                held = self._holders(prefix, holders)
                if slot in held:
                    continue
                left = len(items) - self.taken.get(index, 0)
                capacity = sum(self.capacity.get(s, 0) for s in held)
                if left + self._prefetched(held) <= slack * capacity:
                    continue
                behind = left / max(1, len(held))
                if best is None or behind > best[0]:
                    best = (behind, index, prefix)
            if best is not None:
                _, index, prefix = best
                self.new_holders.setdefault(prefix, set()).add(slot)
                items = groups[index][1]
                last = self.is_last_batch(self._holders(prefix, holders), index, items)
                self._fill(index, items, [slot], not last)

    def _prefetched(self, slots: set[int]) -> int:
        """What these slots hold past their capacity: items that wait for a running one
        to end, as the staged ones do."""
        return sum(max(0, self.outstanding[s] - self.capacity[s]) for s in slots)

    def _holders(self, prefix: int, holders: Mapping[int, set[int]]) -> set[int]:
        known = {s for s in holders.get(prefix, ()) if s in self.room}
        return known | self.new_holders.get(prefix, set())


# --- the router's memory of who holds what ---------------------------------------------


class Affinity:
    """Which slots hold which prefixes (what the router sent them, LRU per slot), and
    how many tokens each prefix's results found cached. Forgotten for a slot when
    its worker dies (a new process starts with an empty cache)."""

    def __init__(self) -> None:
        self.by_slot: dict[int, OrderedDict[int, None]] = {}
        self.holders: dict[int, set[int]] = {}
        self.cached: OrderedDict[int, int] = OrderedDict()

    def hold(self, slot: int, prefix: int) -> None:
        held = self.by_slot.setdefault(slot, OrderedDict())
        if prefix in held:
            held.move_to_end(prefix)
            return
        held[prefix] = None
        self.holders.setdefault(prefix, set()).add(slot)
        if len(held) > HELD_PREFIXES_PER_SLOT:
            old, _ = held.popitem(last=False)
            self._drop(old, slot)

    def forget_slot(self, slot: int) -> None:
        for prefix in self.by_slot.pop(slot, {}):
            self._drop(prefix, slot)

    def _drop(self, prefix: int, slot: int) -> None:
        slots = self.holders.get(prefix)
        if slots is not None:
            slots.discard(slot)
            if not slots:
                del self.holders[prefix]

    def learn(self, prefix: int, cached_tokens: int) -> None:
        """A result of this prefix found ``cached_tokens`` cached: the estimate now."""
        if cached_tokens <= 0:
            return
        self.cached[prefix] = cached_tokens
        self.cached.move_to_end(prefix)
        if len(self.cached) > LEARNED_PREFIXES:
            self.cached.popitem(last=False)

    def shared(self, prefix: int | None, guess: int) -> int:
        if prefix is None:
            return 0
        return self.cached.get(prefix, guess)
