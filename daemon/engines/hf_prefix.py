"""The transformers engine's prefix cache: keys and values of prompt blocks, across batches.

Blocks are keyed and evicted by :class:`prefix.PrefixCache` (a chain of exact token
blocks, LRU over a budget in tokens). A block's value here is its keys and values for
every layer, tensors of shape (kv_heads, block, head_dim), copied out of a
batch's cache right after its prefill, one tensor per layer (a slot of several GPUs
has its layers on different cards). Keys are stored after the rotary embedding:
a prefix always starts at position 0 (positions count real tokens, left padding sits
outside them), so a cached block is valid in any row that starts with its chain.

How a batch uses it (``DecodeBatch._prefill_cached``):

1. Block-aligned prefixes that two or more of the batch's prompts share and the cache
   lacks are prefilled first, once each, as a batch of their own, and stored
   (``shared_prefixes``): the first batch of a job gains too, not only later ones.
2. Each distinct prompt takes its longest cached chain. Where the model's attention
   allows (``share_prefix_kv``, CPU), the chain's first whole multiple of 4 blocks is
   held apart (``SharedRows``): one set of tensors for every row that starts with
   it, which the attention adds to each row's own columns (cascade attention,
   ``hf_kernels.shared_prefix_forward``); the batch cache then holds only the rest
   of each prompt. The rest of the chain (or all of it, without sharing) is copied
   into the prompt's row of the batch cache, where its first columns sit.
3. Only the uncached rest is prefilled, in groups of similar uncached length, each
   group attending to what is held apart and its rows' copied columns as the past.
4. Every whole block of every prompt is stored for later batches.

A row's tokens are the same tokens at the same positions either way, so its output
is the uncached path's up to floating-point rounding (products of other shapes, a
softmax in two parts); greedy fp32 output is tested equal token for token on the
demo model, both with the prefix held apart and copied.

Why hold it apart: a batch of 64 rows over a 610-token few-shot prefix read the
prefix's keys and values from 64 copies (about 930 MB for the demo model) at every
decode step; held apart, 8 prefixes are about 116 MB, read once per segment, and a
row that joins copies only its suffix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from exgen.daemon.engines.hf_kernels import Segment
from exgen.daemon.engines.prefix import Block, PrefixCache, PrefixStats

# Tokens per block: a hit covers a shared prefix to within a block. 16 keeps the miss
# at a prompt's boundary small; the copies per block stay cheap next to its prefill.
DEFAULT_BLOCK = 16
# The default budget (engine option prefix_cache_tokens=-1): this share of the memory
# available at load, in tokens of KV (CPU: host memory; CUDA: the card's free memory).
MEMORY_SHARE = 0.1

# Joined chains (``PrefixKV.join``) hold at most this share of the cache's tokens again.
JOINED_SHARE = 0.25

KV = tuple[list[Any], list[Any]]  # keys, values per layer: (kv_heads, tokens, head_dim)


@dataclass(frozen=True, slots=True)
class Hit:
    """What the cache holds of a prompt: its first ``tokens`` tokens; the first
    ``head_tokens`` of them as ``head``, held apart, the rest as ``tail``, to be
    copied into the prompt's row."""

    tokens: int
    head: KV | None
    head_tokens: int
    tail: KV | None


class PrefixKV:
    """Cached prompt blocks' keys and values, and what using them saved."""

    def __init__(self, torch: Any, block: int, capacity_tokens: int) -> None:
        self.torch = torch
        self.blocks: PrefixCache[KV] = PrefixCache(block, capacity_tokens)
        # Chains joined into one tensor per layer, by their end block's id (never
        # reused): batches that join a running one find the same tensors, so rows
        # holding one chain apart stay one segment, and the chain is joined once.
        # Least recently used first out, beyond a share of the cache's tokens.
        self._joined: OrderedDict[int, KV] = OrderedDict()
        self._joined_tokens = 0

    @property
    def stats(self) -> PrefixStats:
        return self.blocks.stats

    def match_all(self, prompts: Sequence[Sequence[int]], count: bool, grid: int = 0) -> list[Hit]:
        """Per prompt: its longest cached chain. With ``grid`` (blocks), the chain's
        first multiple of ``grid`` blocks is its head, held apart (``SharedRows``)
        and the same tensors for every prompt that shares that many blocks of it:
        prompts of one few-shot prefix whose chains end a block or two apart (a
        question's first tokens cached by another's) share one head. Lookups count in
        the stats when ``count`` (a job's prompt, not a shared prefix)."""
        out: list[Hit] = []
        for ids in prompts:
            chain = self.blocks.match(ids) if count else self.blocks.peek(ids)
            apart = len(chain) // grid * grid if grid else 0
            head = self.join(chain[:apart]) if apart else None
            tail = None
            if apart < len(chain):
                tail = self.join(chain) if not apart else _concat(self.torch, chain[apart:])
            block = self.blocks.block
            out.append(Hit(len(chain) * block, head, apart * block, tail))
        return out

    def heads(self, prompts: Sequence[Sequence[int]], grid: int) -> list[Sequence[Block[KV]]]:
        """Per prompt: the blocks ``match_all`` would hold apart as its head (none:
        empty), nothing joined and nothing counted, so a caller can count the
        segments they would make (``joined``) before paying for them (``join``)."""
        out: list[Sequence[Block[KV]]] = []
        for ids in prompts:
            chain = self.blocks.peek(ids)
            out.append(chain[: len(chain) // grid * grid])
        return out

    def joined(self, head: Sequence[Block[KV]]) -> KV | None:
        """The tensors of ``head`` if they are joined already (``join`` would return
        them), else None."""
        return self._joined.get(head[-1].id)

    def join(self, chain: Sequence[Block[KV]]) -> KV:
        """A chain from its first block, joined, one tensor per layer (and kept:
        ``_joined``, so every caller gets the same tensors while they are kept)."""
        end = chain[-1].id
        found = self._joined.get(end)
        if found is not None:
            self._joined.move_to_end(end)
            return found
        joined = _concat(self.torch, chain)
        self._joined[end] = joined
        self._joined_tokens += len(chain) * self.blocks.block
        limit = self.blocks.capacity_tokens * JOINED_SHARE
        while self._joined_tokens > limit and len(self._joined) > 1:
            _, (gone, _) = self._joined.popitem(last=False)
            self._joined_tokens -= gone[0].shape[1]
        return joined

    def clear(self) -> None:
        self.blocks.clear()
        self._joined.clear()
        self._joined_tokens = 0

    def store(
        self,
        ids: Sequence[int],
        layers: Sequence[Any],
        row: int,
        start: int,
        head: KV | None = None,
    ) -> int:
        """Cache the whole blocks of a prompt whose keys and values sit in ``row`` of a
        batch cache's ``layers`` from column ``start``; returns the blocks added. With
        ``head`` (a shared prefix the row holds apart, ``SharedRows``), the row's
        columns start after it, and its own blocks come from it: the cache may have
        let them go since the match (evicted by this batch's other prompts)."""
        block = self.blocks.block
        cached = 0 if head is None else head[0][0].shape[1]

        def make(index: int) -> KV:
            lo = index * block
            if head is not None and lo < cached:
                keys = [k[:, lo : lo + block].clone() for k in head[0]]
                values = [v[:, lo : lo + block].clone() for v in head[1]]
                return keys, values
            cols = slice(start + lo - cached, start + lo - cached + block)
            keys = [layer.key_buffer[row, :, cols].clone() for layer in layers]
            values = [layer.value_buffer[row, :, cols].clone() for layer in layers]
            return keys, values

        return self.blocks.insert(ids, make)


class SharedRows:
    """Which rows of a batch hold which cached prefix apart, stored once (the batch
    cache then holds only what follows it): per row, the prefix's keys and values, or
    None. Rows that hold the same prefix (the same tensors) form one segment of the
    attention (``hf_kernels.shared_prefix_forward``)."""

    def __init__(self, torch: Any, heads: list[KV | None]) -> None:
        self.torch = torch
        self.heads = heads
        self._segments: list[Segment] | None = None  # for all rows, until they change

    def extend(self, other: SharedRows) -> None:
        """Rows joining the batch, after its own."""
        self.heads = self.heads + other.heads
        self._segments = None

    def hold(self, row: int, head: KV) -> None:
        """Row ``row`` now holds ``head`` apart (its columns no longer do)."""
        self.heads[row] = head
        self._segments = None

    def select(self, keep: Sequence[int]) -> None:
        """Only these rows stay, in this order (compaction)."""
        self.heads = [self.heads[i] for i in keep]
        self._segments = None

    def segments(self, rows: Sequence[int] | None = None) -> list[Segment]:
        """The segments of ``rows`` (all by default), their row indices counted within
        ``rows``; none when no row holds a prefix apart."""
        if rows is None:
            if self._segments is None:
                self._segments = self._group(range(len(self.heads)))
            return self._segments
        return self._group(rows)

    def _group(self, rows: Iterable[int]) -> list[Segment]:
        members: dict[int, list[int]] = {}
        heads: dict[int, KV] = {}
        for position, row in enumerate(rows):
            head = self.heads[row]
            if head is not None:
                members.setdefault(id(head), []).append(position)
                heads[id(head)] = head
        return [
            Segment(heads[key][0], heads[key][1], self.torch.tensor(positions))
            for key, positions in members.items()
        ]


def _concat(torch: Any, blocks: Sequence[Block[KV]]) -> KV:
    """Blocks' keys and values joined along the tokens, one tensor per layer."""
    layers = range(len(blocks[0].value[0]))
    keys = [torch.cat([b.value[0][n] for b in blocks], dim=1) for n in layers]
    values = [torch.cat([b.value[1][n] for b in blocks], dim=1) for n in layers]
    return keys, values


def default_capacity_tokens(kv_bytes_per_token: int | None, available: int | None) -> int:
    """The auto budget in tokens; 0 (no cache) when either size is unknown."""
    if not kv_bytes_per_token or not available:
        return 0
    return int(available * MEMORY_SHARE) // kv_bytes_per_token
