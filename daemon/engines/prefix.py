"""A prefix cache's bookkeeping: prompt blocks chained by their prefix, kept LRU.

Engines that reuse a shared prompt prefix (the transformers engine's keys and values,
the synthetic engine's simulated prefill) key it the way vLLM and SGLang do: a prompt
is cut into blocks of ``block`` tokens, and a block is known by its tokens together
with the block before it, so a block stands for the whole prefix that ends with it.
Here the key is exact, not a digest: ``(parent's id, the block's tokens)``. Two
prompts share a cached block only if they share every token up to its end.

Only whole blocks are cached, and a lookup leaves at least the prompt's last token
uncached (its logits start the generation), so a hit is at most
``(len(prompt) - 1) // block`` blocks.

Eviction is least recently used, over a budget in tokens. A lookup or an insert
touches its chain from the last block back to the first, so a block is always at
least as recent as every block after it: the oldest entry never has a child, and
eviction takes chain ends first, never leaving a block whose parent is gone.

What a block holds (``value``) is the engine's: tensors, or nothing at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")
T = TypeVar("T", bound=Hashable)  # a token: an id, or a word (synthetic)

ROOT = 0  # the parent id of a prompt's first block


@dataclass(slots=True)
class Block(Generic[V]):
    id: int
    key: tuple[int, tuple[Hashable, ...]]
    value: V


@dataclass(slots=True)
class PrefixStats:
    """Counters an engine reports: lookups, hits (a lookup that reused at least a block),
    tokens reused (the prefill they saved) and tokens that had to be prefilled."""

    lookups: int = 0
    hits: int = 0
    tokens_saved: int = 0
    tokens_prefilled: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "prefix_lookups": self.lookups,
            "prefix_hits": self.hits,
            "prefill_tokens_saved": self.tokens_saved,
            "prefill_tokens": self.tokens_prefilled,
        }


class PrefixCache(Generic[V]):
    """Blocks of ``block`` tokens, at most ``capacity_tokens`` tokens of them."""

    def __init__(self, block: int, capacity_tokens: int) -> None:
        if block < 1:
            raise ValueError("block must be at least 1")
        self.block = block
        self.capacity_blocks = max(0, capacity_tokens) // block
        self._entries: OrderedDict[tuple[int, tuple[Hashable, ...]], Block[V]] = OrderedDict()
        self._next_id = ROOT + 1
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return len(self._entries) * self.block

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block

    def usable_blocks(self, length: int) -> int:
        """How many of a prompt's blocks a hit may cover (its last token stays)."""
        return max(0, length - 1) // self.block

    def keys(self, tokens: Sequence[Hashable], count: int) -> list[tuple[Hashable, ...]]:
        b = self.block
        return [tuple(tokens[i * b : (i + 1) * b]) for i in range(count)]

    def peek(self, tokens: Sequence[Hashable]) -> list[Block[V]]:
        """The longest cached chain this prompt may reuse, without touching it."""
        chain: list[Block[V]] = []
        parent = ROOT
        for part in self.keys(tokens, self.usable_blocks(len(tokens))):
            found = self._entries.get((parent, part))
            if found is None:
                break
            chain.append(found)
            parent = found.id
        return chain

    def match(self, tokens: Sequence[Hashable]) -> list[Block[V]]:
        """``peek``, touched and counted as a lookup."""
        chain = self.peek(tokens)
        self._touch(chain)
        self.stats.lookups += 1
        if chain:
            self.stats.hits += 1
        return chain

    def insert(self, tokens: Sequence[Hashable], make: Callable[[int], V]) -> int:
        """Cache every whole block of ``tokens`` not cached yet (``make(i)`` gives block
        i's value), evicting the least recently used; returns how many were added."""
        count = min(len(tokens) // self.block, self.capacity_blocks)
        chain: list[Block[V]] = []
        added = 0
        parent = ROOT
        for index, part in enumerate(self.keys(tokens, count)):
            key = (parent, part)
            found = self._entries.get(key)
            if found is None:
                found = Block(self._next_id, key, make(index))
                self._next_id += 1
                self._entries[key] = found
                added += 1
            chain.append(found)
            parent = found.id
        self._touch(chain)
        while len(self._entries) > self.capacity_blocks:
            self._entries.popitem(last=False)  # a chain's end (see the module's note)
        return added

    def clear(self) -> None:
        self._entries.clear()

    def _touch(self, chain: list[Block[V]]) -> None:
        for found in reversed(chain):  # the first block ends newest
            self._entries.move_to_end(found.key)


def shared_prefixes(cache: PrefixCache[V], prompts: Sequence[Sequence[T]]) -> list[list[T]]:
    """Block-aligned prefixes that two or more of these prompts share and the cache does
    not hold yet: prefilled once each, before the prompts, they are what the prompts
    reuse. Only the longest of nested prefixes is returned (prefilling it caches the
    shorter ones too)."""
    counts: dict[tuple[int, tuple[Hashable, ...]], int] = {}
    ids: dict[tuple[int, tuple[Hashable, ...]], int] = {}
    paths: list[list[tuple[int, tuple[Hashable, ...]]]] = []
    for tokens in prompts:
        parent, path = ROOT, []
        for part in cache.keys(tokens, cache.usable_blocks(len(tokens))):
            key = (parent, part)
            parent = ids.setdefault(key, len(ids) + 1)
            counts[key] = counts.get(key, 0) + 1
            path.append(key)
        paths.append(path)
    wanted: dict[tuple[T, ...], list[T]] = {}
    for tokens, path in zip(prompts, paths, strict=True):
        shared = 0
        while shared < len(path) and counts[path[shared]] > 1:
            shared += 1
        if shared > len(cache.peek(tokens)):
            prefix = list(tokens[: shared * cache.block])
            wanted[tuple(prefix)] = prefix
    longest_first = sorted(wanted.values(), key=len, reverse=True)
    kept: list[list[T]] = []
    for prefix in longest_first:
        if not any(k[: len(prefix)] == prefix for k in kept):
            kept.append(prefix)
    return kept
