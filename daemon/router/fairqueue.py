"""The waiting room: items accepted but not yet on a worker, as ledger keys.

- A *front* lane: items handed back by a crashed worker, served first.
- A *probation* lane: items that were on board two crashed workers; the router takes
  them one at a time for a worker drained for them (``take_probation``), never in a
  batch, so a poison prompt is pinned down without costing its neighbours.
- Priority tiers (``protocol.PRIORITIES``: interactive, then batch): a tier is served
  only when the tiers above it have nothing to dispatch.
- Within a tier, one lane per client, served round-robin: a 100,000-line file never
  starves a one-line request. Within a lane the largest token budget goes first
  (``Lane``).
- A paused client keeps its lanes but is skipped (it cannot take results now: too
  many unread, unreachable, or not acknowledging; ``Delivery.update_pause``).
- A *staging area* (``stage``), used by placement: keys taken in the order above, a
  bounded number at a time, grouped by (priority tier, prefix key), for placement to
  choose from (``placement.plan_placement``, higher tiers first). Staged keys still wait (counted in
  ``size``, removed by ``remove``, handed back by ``drain_all``).

No sockets and no clocks: the router and the tests drive it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

Group = tuple[int, int | None]  # a staged group: (priority tier, prefix key or None)


class Lane:
    """One client's waiting items: the largest token budget first, else arrival order.

    Longest-first by ``max_new_tokens`` (the classic LPT rule): a long generation
    started last is what leaves the other devices idle at the end of a job, and the
    budget is the only length the router knows before generating. Items with equal
    budgets keep their arrival order, and a lane whose items all share one budget
    (the common case: one file, one setting) stays a plain FIFO at deque cost.
    With ``longest_first`` False the lane is always FIFO.
    """

    __slots__ = ("budget", "fifo", "heap", "longest_first", "seq")

    def __init__(self, longest_first: bool) -> None:
        self.fifo: deque[int] = deque()
        self.heap: list[tuple[int, int, int]] | None = None  # (-budget, seq, key)
        self.budget: int | None = None  # the one budget while FIFO
        self.longest_first = longest_first
        self.seq = 0

    def __len__(self) -> int:
        return len(self.fifo) if self.heap is None else len(self.heap)

    def push(self, key: int, budget: int) -> None:
        if self.heap is None:
            if not self.longest_first or self.budget in (None, budget) or not self.fifo:
                self.budget = budget if self.longest_first else None
                self.fifo.append(key)
                return
            self._to_heap()
        assert self.heap is not None
        self.seq += 1
        heapq.heappush(self.heap, (-budget, self.seq, key))

    def pop(self) -> int:
        if self.heap is None:
            return self.fifo.popleft()
        key = heapq.heappop(self.heap)[2]
        if not self.heap:
            self.heap, self.budget = None, None  # empty: back to the cheap FIFO
        return key

    def discard(self, keys: set[int]) -> None:
        """Drop these keys; the others keep their places."""
        if self.heap is None:
            self.fifo = deque(k for k in self.fifo if k not in keys)
            return
        self.heap = [entry for entry in self.heap if entry[2] not in keys]
        heapq.heapify(self.heap)
        if not self.heap:
            self.heap, self.budget = None, None

    def in_order(self) -> list[int]:
        """Every key, in the order they would be taken."""
        if self.heap is None:
            return list(self.fifo)
        return [entry[2] for entry in sorted(self.heap)]

    def _to_heap(self) -> None:
        budget = self.budget or 0
        self.heap = []
        for key in self.fifo:
            self.seq += 1
            self.heap.append((-budget, self.seq, key))
        self.fifo.clear()  # already in heap order: equal budgets, rising seq


class FairQueue:
    """Front lane, then priority tiers of per-client lanes served round-robin."""

    def __init__(self, longest_first: bool = True, tiers: int = 2) -> None:
        self.tiers: list[OrderedDict[bytes, Lane]] = [OrderedDict() for _ in range(tiers)]
        self.front: deque[int] = deque()
        self.probation: deque[int] = deque()
        self.paused: set[bytes] = set()
        self.size = 0  # every waiting key, probation and paused clients' included
        self.longest_first = longest_first
        self.staged: dict[Group, deque[int]] = {}  # (tier, prefix) -> keys, fair order
        self.staged_count = 0

    def waiting(self, client: bytes) -> int:
        return sum(len(tier[client]) for tier in self.tiers if client in tier)

    @property
    def dispatchable(self) -> int:
        """Keys ``take`` could hand out now (not on probation, not of a paused client)."""
        paused = sum(self.waiting(client) for client in self.paused)
        return self.size - len(self.probation) - paused

    def push(self, client: bytes, key: int, budget: int = 0, tier: int = 0) -> None:
        lanes = self.tiers[tier]
        lane = lanes.get(client)
        if lane is None:
            lane = lanes[client] = Lane(self.longest_first)
        lane.push(key, budget)
        self.size += 1

    def push_front(self, keys: Iterable[int]) -> None:
        """Keys back from a crashed worker, in the order given, ahead of everything."""
        keys = list(keys)
        self.front.extendleft(reversed(keys))
        self.size += len(keys)

    def push_probation(self, key: int) -> None:
        self.probation.append(key)
        self.size += 1

    def take_probation(self) -> int | None:
        if not self.probation:
            return None
        self.size -= 1
        return self.probation.popleft()

    def pause(self, client: bytes) -> None:
        self.paused.add(client)

    def resume(self, client: bytes) -> None:
        self.paused.discard(client)

    def take(self, n: int) -> list[int]:
        """Up to ``n`` keys: the front lane, then each tier's clients in turn."""
        out: list[int] = []
        while self.front and len(out) < n:
            out.append(self.front.popleft())
        for lanes in self.tiers:
            if len(out) >= n:
                break
            self._take_round_robin(lanes, n, out)
        self.size -= len(out)
        return out

    def _take_round_robin(self, lanes: OrderedDict[bytes, Lane], n: int, out: list[int]) -> None:
        while len(out) < n:
            active = [client for client in lanes if client not in self.paused]
            if not active:
                return
            # One round: each client gets an equal share of what is left.
            share = max(1, (n - len(out)) // len(active))
            for client in active:
                lane = lanes[client]
                for _ in range(min(share, len(lane), n - len(out))):
                    out.append(lane.pop())
                if lane:
                    lanes.move_to_end(client)
                else:
                    del lanes[client]
                if len(out) >= n:
                    return

    def stage(self, n: int, group_of: Callable[[int], Group]) -> None:
        """Up to ``n`` more keys (``take``'s order) into the staging area, by group."""
        keys = self.take(n)
        staged = self.staged
        for key in keys:
            name = group_of(key)
            group = staged.get(name)
            if group is None:
                group = staged[name] = deque()
            group.append(key)
        self.size += len(keys)  # still waiting
        self.staged_count += len(keys)

    def unstage(self, name: Group, keys: set[int]) -> None:
        """These keys, leading their group, leave the staging area (dispatched)."""
        group = self.staged[name]
        while group and group[0] in keys:
            group.popleft()
            self.size -= 1
            self.staged_count -= 1
        if not group:
            del self.staged[name]

    def remove(self, keys: set[int]) -> None:
        """Drop keys wherever they wait (cancel); cost is linear, cancels are rare."""
        self.front = deque(k for k in self.front if k not in keys)
        self.probation = deque(k for k in self.probation if k not in keys)
        for name in list(self.staged):
            group = deque(k for k in self.staged[name] if k not in keys)
            if group:
                self.staged[name] = group
            else:
                del self.staged[name]
        self.staged_count = sum(len(group) for group in self.staged.values())
        for lanes in self.tiers:
            for client in list(lanes):
                lane = lanes[client]
                lane.discard(keys)
                if not lane:
                    del lanes[client]
        self.size = len(self.front) + len(self.probation) + self.staged_count + self._lane_total()

    def drain_all(self) -> list[int]:
        """Every waiting key (staged, front, lanes in order, probation); the queue is
        left empty."""
        keys = [key for group in self.staged.values() for key in group]
        self.staged.clear()
        self.staged_count = 0
        keys.extend(self.front)
        for lanes in self.tiers:
            for lane in lanes.values():
                keys.extend(lane.in_order())
            lanes.clear()
        keys.extend(self.probation)
        self.front.clear()
        self.probation.clear()
        self.size = 0
        return keys

    def _lane_total(self) -> int:
        return sum(len(lane) for lanes in self.tiers for lane in lanes.values())
