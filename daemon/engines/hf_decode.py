"""One static batch of the transformers engine, decoded a step at a time.

The engine's own loop instead of ``model.generate``: every ``step()`` is one forward
pass of the whole batch (the first one the prefill), so a worker can send streamed
text, heartbeats and finished results between tokens, and a cancelled row stops.
The forward pass is the model's own, with the inputs ``generate`` would give it
(left padding, positions from the attention mask, the same logits processors), so
greedy output is what ``generate`` gives, token for token (tested).

What it does that ``generate`` does not, measured on the demo model (2 cores):

- The KV cache is reserved once for the batch's longest row (``ReservedLayer``): a
  step writes its keys and values in place, where ``DynamicCache`` concatenates the
  whole cache again every step (7 % of the time in a py-spy profile).
- Prompts are prefilled in groups of similar length, each padded only to its own
  longest prompt; the groups' keys and values land right-aligned in the batch's
  cache. One left-padded prefill of the seeds' prompts (38–69 tokens) computed 28 %
  padding.
- A finished row leaves the batch once a quarter of the rows have (the cache is
  compacted): its slot no longer costs compute.
- Streamed text is decoded only for rows that asked for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.engines.base import (
    Chunk,
    Event,
    Finished,
    Job,
    SamplingParams,
    find_stop,
    text_to_stop,
)
from exgen.daemon.engines.hf_features import BatchFeatures, RowExtras, row_failed, text_logprobs
from exgen.daemon.engines.hf_kernels import attending_to
from exgen.daemon.engines.hf_prefix import KV, Hit, PrefixKV, SharedRows
from exgen.daemon.engines.prefix import Block, shared_prefixes

logger = logging.getLogger(__name__)

# Prefill groups hold at most this many prompt tokens (padding included): large
# enough for efficient matrix products, small enough that sorting by length pays.
PREFILL_GROUP_TOKENS = 1024
# Finished rows leave the batch when they are this share of it (compaction copies
# the cache once, about what one step of attention reads).
COMPACT_SHARE = 0.25
# A join that must widen the cache widens it by an eighth more (at least this many
# columns, at most the joining prompts' width): the next joins fit without a copy.
GROW_MIN_COLUMNS = 16
# A cached prefix held apart from its rows (``SharedRows``) is cut to a multiple of
# this many blocks (64 tokens), the rest copied into each row: rows of one few-shot
# prefix whose cached chains end a block or two apart (a question's first tokens
# cached by another's) then share one segment of the attention, where each own chain
# made a segment of its own: 8,400 one-row segment calls in a 96-prompt run.
HELD_APART_GRID = 4
# At most this many segments of rows sharing a prefix held apart, in a batch that
# holds prompts apart after their prefill (each costs a few small ops per layer and
# step).
MAX_SEGMENTS = 8
# A stream holds back a partial UTF-8 character (decoded as U+FFFD).
REPLACEMENT = "\ufffd"


@dataclass(slots=True)
class Row:
    job: Job
    input_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text streamed so far
    done: bool = False
    extras: RowExtras = field(default_factory=RowExtras)  # schema, logprobs, sample index
    cached: int = 0  # leading prompt tokens taken from the prefix cache, not prefilled


@dataclass(slots=True)
class Model:
    """What a batch needs of the loaded model."""

    torch: Any
    model: Any
    tokenizer: Any
    eos_ids: frozenset[int]
    pad_id: int
    # The model runs hf_kernels.shared_prefix_forward: a cached prefix may stay apart,
    # once for all the rows that start with it (``SharedRows``).
    shares_prefix_kv: bool = False


def make_reserved_layer_class() -> type:
    """``ReservedLayer``, defined on first use: transformers is imported in workers only."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values live in a buffer reserved for the batch."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.key_buffer: Any = None
            self.value_buffer: Any = None

        def reserve(self, like: Any, batch: int) -> None:
            import torch

            shape = (batch, like.shape[1], self.capacity, like.shape[3])
            self.key_buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.value_buffer = torch.zeros_like(self.key_buffer)
            self.device = like.device
            self.is_initialized = True

        def place(self, rows: Any, start: int, keys: Any, values: Any) -> None:
            """Prefill of some rows: their keys and values at positions start.."""
            end = start + keys.shape[2]
            self.key_buffer[rows, :, start:end] = keys
            self.value_buffer[rows, :, start:end] = values
            self.length = max(self.length, end)
            self._expose()

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            if self.key_buffer is None:
                self.reserve(key_states, key_states.shape[0])
            end = self.length + key_states.shape[2]
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self._expose()
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self._expose()

        def _expose(self) -> None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

    return ReservedLayer


_RESERVED: type | None = None


def reserved_cache(model: Any, capacity: int) -> tuple[Any, bool]:
    """A cache for one batch, and whether every layer is a ReservedLayer (then grouped
    prefill works). Layers of other kinds (sliding windows...) stay as transformers
    makes them."""
    global _RESERVED
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if _RESERVED is None:
        _RESERVED = make_reserved_layer_class()
    cache = DynamicCache(config=model.config)
    reserved = True
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = _RESERVED(capacity)
        else:
            reserved = False
    return cache, reserved and bool(cache.layers)


def prefill_groups(lengths: list[int], budget: int = PREFILL_GROUP_TOKENS) -> list[list[int]]:
    """Row indices in groups of similar prompt length, each group's rows x its longest
    prompt at most ``budget`` tokens (a group has at least one row)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[int], dict[int, list[int]]]:
    """The first row of each distinct prompt, and every row holding it (by first row)."""
    first_of: dict[tuple[int, ...], int] = {}
    holders: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        first = first_of.setdefault(tuple(ids), i)
        holders.setdefault(first, []).append(i)
    return list(holders), holders


def stream_ready(text: str, sent: str, hold: int) -> str:
    """New text a stream may send now: not the last ``hold`` characters (a stop string
    may still start there) and no partial character."""
    if not text.startswith(sent):
        return ""  # a decode that changed earlier text: the final text settles it
    end = max(len(sent), len(text) - hold)
    new = text[len(sent) : end]
    cut = new.find(REPLACEMENT)
    return new if cut < 0 else new[:cut]


class DecodeBatch:
    """Rows that share one forward pass per step until each is finished or cancelled."""

    def __init__(
        self,
        model: Model,
        rows: list[Row],
        processors: Any,
        greedy: bool,
        features: BatchFeatures | None = None,
        prefixes: PrefixKV | None = None,
    ) -> None:
        self.m = model
        self.rows = rows
        self.prefixes = prefixes
        self.processors = processors
        self.greedy = greedy
        self.features = features
        self.steps = 0
        self.shared = SharedRows(model.torch, [None] * len(rows))  # prefixes held apart
        self._lay_out([r.input_ids for r in rows], [0] * len(rows))
        self.hold = max((len(s) for r in rows for s in r.job.params.stop), default=1) - 1
        self.tail = self.hold + 9  # tokens whose text can hold a stop string (>= 1 char each)
        self.joined = False  # rows have joined it while it ran (its columns then slide)

    def _lay_out(self, held: list[list[int]], offsets: list[int]) -> None:
        """The batch's columns before its prefill: the tokens each row holds in them
        (its prompt, or what follows a prefix held apart), right-aligned; ``offsets``:
        the tokens before them (positions count from the prompt's start)."""
        torch = self.m.torch
        self.width = max(len(ids) for ids in held)
        self.lengths = [len(ids) for ids in held]  # each row's prompt columns
        longest = max(r.job.params.max_new_tokens for r in self.rows)
        total = self.width + longest
        self.cache, self._grouped = reserved_cache(self.m.model, total)
        device = self.m.model.device
        self.mask = torch.zeros((len(held), total), dtype=torch.long, device=device)
        self.sequences = torch.full(
            (len(held), total), self.m.pad_id, dtype=torch.long, device=device
        )
        for i, ids in enumerate(held):
            pad = self.width - len(ids)
            self.mask[i, pad : self.width] = 1
            self.sequences[i, pad : self.width] = torch.tensor(ids)
        self.length = self.width
        self.offsets = torch.tensor(offsets, device=device).unsqueeze(1)
        counted = (self.mask[:, : self.width].sum(1, keepdim=True) - 1).clamp(min=0)
        self.positions = counted + self.offsets
        self.starts = [self.width - n for n in self.lengths]  # each row's first column

    # --- the public side --------------------------------------------------------

    @property
    def finished(self) -> bool:
        return all(r.done for r in self.rows)

    def active_keys(self) -> list[int]:
        return [r.job.key for r in self.rows if not r.done]

    def cancel(self, key: int) -> bool:
        for row in self.rows:
            if row.job.key == key and not row.done:
                row.done = True
                return True
        return False

    @property
    def joinable(self) -> bool:
        """Rows may join it at a step: it has started, and nothing reads its columns as
        generated text (penalties, schemas, logprobs keep static batches)."""
        return self.steps > 0 and self.features is None and not self._reads_sequences()

    def _reads_sequences(self) -> bool:
        return any(r.job.params.repetition_penalty != 1.0 for r in self.rows)

    def step(self, joining: DecodeBatch | None = None) -> list[Event]:
        """One forward pass (the first: the prefill) and what it finished or streamed.
        ``joining``: a batch of new rows (continuous batching): this step is its
        prefill alone, whose first tokens are events at once, and its rows then join
        this batch's; this batch's own rows wait that one step."""
        if joining is not None and self.steps > 0:
            events = joining.step()
            if not joining.finished:
                self._merge(joining)
            return events
        with self.m.torch.inference_mode():
            logits = self._prefill() if self.steps == 0 else self._decode()
            tokens = self._choose(logits)
        self.steps += 1
        events = self._advance(tokens.tolist())
        self._compact_if_worth_it()
        return events

    # --- forward passes -----------------------------------------------------------

    def _prefill(self) -> Any:
        if self.prefixes is not None and self._grouped:
            return self._prefill_cached(self.prefixes)
        if not self._grouped or len(self.rows) == 1:
            out = self.m.model(
                input_ids=self.sequences[:, : self.width],
                attention_mask=self.mask[:, : self.width],
                position_ids=self._prompt_positions(self.mask[:, : self.width]),
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[:, -1]
        return self._prefill_grouped()

    def _prefill_grouped(self) -> Any:
        """Each distinct prompt once (a job's n samples share theirs), in length groups;
        its keys, values and logits copied to every row that holds it."""
        torch = self.m.torch
        from transformers import DynamicCache

        logits: Any = None
        firsts, holders = distinct_prompts([r.input_ids for r in self.rows])
        lengths = [self.lengths[i] for i in firsts]
        for group in prefill_groups(lengths):
            reps = [firsts[g] for g in group]
            width = max(self.lengths[i] for i in reps)
            source = torch.tensor(reps, device=self.mask.device)
            cols = slice(self.width - width, self.width)
            mask = self.mask[source, cols]
            scratch: Any = DynamicCache(config=self.m.model.config)
            out = self.m.model(
                input_ids=self.sequences[source, cols],
                attention_mask=mask,
                position_ids=self._prompt_positions(mask),
                cache=scratch,
                use_cache=True,
                logits_to_keep=1,
            )
            if logits is None:
                logits = out.logits.new_empty((len(self.rows), out.logits.shape[-1]))
            rows = [row for rep in reps for row in holders[rep]]
            copies = None  # which computed row each batch row takes (None: one each)
            if len(rows) > len(reps):
                copies = torch.tensor([j for j, rep in enumerate(reps) for _ in holders[rep]])
            index = torch.tensor(rows, device=self.mask.device)
            logits[index] = out.logits[:, -1] if copies is None else out.logits[copies, -1]
            for layer, done in zip(self.cache.layers, scratch.layers, strict=True):
                if layer.key_buffer is None:
                    layer.reserve(done.keys, len(self.rows))
                keys, values = done.keys, done.values
                if copies is not None:
                    keys, values = keys[copies], values[copies]
                layer.place(index, self.width - width, keys, values)
        return logits

    def _prefill_cached(self, prefixes: PrefixKV, count: bool = True) -> Any:
        """The prefill with the prefix cache (the steps in ``hf_prefix``): each distinct
        prompt's cached blocks held apart (``_hold_apart``) or copied in, the rest
        prefilled in groups of similar uncached length that attend to them as their
        past."""
        firsts, holders = distinct_prompts([r.input_ids for r in self.rows])
        prompts = [self.rows[i].input_ids for i in firsts]
        warm_shared_prefixes(self.m, prefixes, prompts)
        grid = HELD_APART_GRID if self._holds_prefixes_apart() else 0
        hits = prefixes.match_all(prompts, count, grid)
        if any(hit.head is not None for hit in hits):
            self._hold_apart(hits, firsts, holders)
        self._copy_hits(hits, firsts, holders)
        uncached = [len(ids) - hit.tokens for ids, hit in zip(prompts, hits, strict=True)]
        logits: Any = None
        for group in prefill_groups(uncached):
            reps = [firsts[g] for g in group]
            width = max(uncached[g] for g in group)  # the columns computed for this group
            out = self._prefill_suffixes(reps, holders, width)
            if logits is None:
                logits = out.new_empty((len(self.rows), out.shape[-1]))
            for j, g in enumerate(group):
                prefilled = min(len(prompts[g]), width)
                prefixes.stats.tokens_prefilled += prefilled
                for i in holders[firsts[g]]:
                    logits[i] = out[j]
                    self.rows[i].cached = len(prompts[g]) - prefilled
                if count:
                    prefixes.stats.tokens_saved += len(prompts[g]) - prefilled
        for first, ids, hit in zip(firsts, prompts, hits, strict=True):
            prefixes.store(ids, self.cache.layers, first, self.starts[first], hit.head)
        if grid and count:
            bare = [f for f, hit in zip(firsts, hits, strict=True) if hit.head is None]
            self._hold_stored_apart(prefixes, grid, bare, holders)
        return logits

    def _hold_stored_apart(
        self, prefixes: PrefixKV, grid: int, firsts: list[int], holders: dict[int, list[int]]
    ) -> None:
        """Rows whose prompt had no head to hold apart, held apart now that their
        prefill stored it: the first rows of a prefix (a job's prompts arrive a few at a
        time, so the first of each prefix finds nothing cached) would otherwise keep the
        batch as wide as their prompts, and every row that joins pays for those columns
        (one worker's share fed 8 prompts a step: 13.4 and 12.7 s for jobs of new
        prefixes, 10.2 and 9.9 s with this). Not where it would make more than
        ``MAX_SEGMENTS`` segments: a batch of unrelated long prompts keeps them in its
        columns."""
        chains = prefixes.heads([self.rows[i].input_ids for i in firsts], grid)
        found = {i: chain for i, chain in zip(firsts, chains, strict=True) if chain}
        if not found or self._segments_with(prefixes, found.values()) > MAX_SEGMENTS:
            return
        block = prefixes.blocks.block
        for first, chain in found.items():
            head, tokens = prefixes.join(chain), len(chain) * block
            for i in holders[first]:
                self.mask[i, self.starts[i] : self.starts[i] + tokens] = 0
                self.starts[i] += tokens
                self.shared.hold(i, head)
        drop = min(self.starts)
        if drop:
            self._relayout(-drop, self.mask.shape[1] - drop)

    def _segments_with(self, prefixes: PrefixKV, chains: Iterable[Sequence[Block[KV]]]) -> int:
        """The segments this batch would hold with these heads held apart too, counted
        before anything is joined: a head joined already is its tensors, one not yet
        joined its end block (a chain is known by its end)."""
        held: set[int] = {id(head) for head in self.shared.heads if head is not None}
        new_ends: set[int] = set()
        for chain in chains:
            joined = prefixes.joined(chain)
            if joined is None:
                new_ends.add(chain[-1].id)
            else:
                held.add(id(joined))
        return len(held) + len(new_ends)

    def _holds_prefixes_apart(self) -> bool:
        """Whether cached prefixes may stay apart from the rows: the model's attention
        adds them (``Model.shares_prefix_kv``), and nothing reads a row's columns as
        its prompt (penalties over the prompt, per-row features)."""
        return self.m.shares_prefix_kv and self.features is None and not self._reads_sequences()

    def _hold_apart(
        self, hits: list[Hit], firsts: list[int], holders: dict[int, list[int]]
    ) -> None:
        """Each row's cached head apart (``SharedRows``), its columns laid out again
        for the rest of its prompt alone."""
        heads: list[KV | None] = [None] * len(self.rows)
        apart = [0] * len(self.rows)
        for first, hit in zip(firsts, hits, strict=True):
            for i in holders[first]:
                heads[i], apart[i] = hit.head, hit.head_tokens
        self.shared = SharedRows(self.m.torch, heads)
        self._lay_out([r.input_ids[n:] for r, n in zip(self.rows, apart, strict=True)], apart)

    def _copy_hits(self, hits: list[Hit], firsts: list[int], holders: dict[int, list[int]]) -> None:
        """Cached keys and values not held apart into the batch cache, where each
        prompt's columns start."""
        for first, hit in zip(firsts, hits, strict=True):
            if hit.tail is None:
                continue
            cached = hit.tokens - hit.head_tokens
            keys, values = hit.tail
            for i in holders[first]:
                start = self.starts[i]
                for n, layer in enumerate(self.cache.layers):
                    if layer.key_buffer is None:
                        layer.reserve(keys[n].unsqueeze(0), len(self.rows))
                    layer.key_buffer[i, :, start : start + cached] = keys[n]
                    layer.value_buffer[i, :, start : start + cached] = values[n]

    def _prefill_suffixes(self, reps: list[int], holders: dict[int, list[int]], width: int) -> Any:
        """Prefill the last ``width`` columns of rows ``reps``, attending to what the
        batch cache holds before them; their keys and values go into the batch cache,
        to every row holding the same prompt, and their last logits are returned."""
        torch = self.m.torch
        from transformers import DynamicCache

        source = torch.tensor(reps, device=self.mask.device)
        start = min(self.starts[i] for i in reps)
        past_end = self.width - width
        scratch: Any = DynamicCache(config=self.m.model.config)
        if past_end > start:
            for n, layer in enumerate(self.cache.layers):
                scratch.update(
                    layer.key_buffer[source, :, start:past_end],
                    layer.value_buffer[source, :, start:past_end],
                    n,
                )
        mask = self.mask[source, start : self.width]
        with attending_to(self.shared.segments(reps)):
            out = self.m.model(
                input_ids=self.sequences[source, past_end : self.width],
                attention_mask=mask,
                position_ids=self._prompt_positions(mask)[:, -width:] + self.offsets[source],
                cache=scratch,
                use_cache=True,
                logits_to_keep=1,
            )
        pairs = [(i, j) for j, rep in enumerate(reps) for i in holders[rep]]
        index = torch.tensor([i for i, _ in pairs], device=self.mask.device)
        which = torch.tensor([j for _, j in pairs], device=self.mask.device)
        for layer, done in zip(self.cache.layers, scratch.layers, strict=True):
            if layer.key_buffer is None:
                layer.reserve(done.keys, len(self.rows))
            keys = done.keys[which, :, -width:]
            values = done.values[which, :, -width:]
            layer.place(index, past_end, keys, values)
        return out.logits[:, -1]

    def _prompt_positions(self, mask: Any) -> Any:
        # As generate() does: positions count real tokens; padding sits at 0.
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def _decode(self) -> Any:
        end = self.length
        with attending_to(self.shared.segments()):
            out = self.m.model(
                input_ids=self.sequences[:, end - 1 : end],
                attention_mask=self.mask[:, :end],
                position_ids=self.positions,
                cache=self.cache,
                use_cache=True,
            )
        return out.logits[:, -1]

    def _choose(self, logits: Any) -> Any:
        torch = self.m.torch
        scores = logits.to(dtype=torch.float32)
        features = self.features
        if features is not None:  # logprobs, penalties, schema masks (hf_features)
            extras = [r.extras for r in self.rows]
            features.observe(extras, scores)
            scores = features.constrain(extras, scores, self.sequences[:, self.width : self.length])
        scores = self._hold_eos(scores)
        if self.processors:
            scores = self.processors(self.sequences[:, : self.length], scores)
        if self.greedy:
            # max's indices, not argmax: the same first maximal index (ties and NaN
            # alike), and torch's CPU argmax is 5x slower over a 49152-wide vocabulary
            # (6.7 against 1.3 ms at 50 rows, one thread; 7 % of a decode step).
            chosen = scores.max(-1).indices
        else:
            chosen = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        flags = [r.done for r in self.rows]
        done = torch.tensor(flags, device=chosen.device)
        chosen = chosen.masked_fill(done, self.m.pad_id)
        if features is not None:
            features.chosen(extras, chosen.tolist(), flags)
        column = self.length
        self.sequences[:, column] = chosen
        self.mask[:, column] = 1
        self.length += 1
        self.positions = self.positions + 1  # where the chosen token goes in
        return chosen

    def _hold_eos(self, scores: Any) -> Any:
        """Rows short of their min_tokens cannot choose an EOS token (vLLM's rule)."""
        held = [
            i
            for i, r in enumerate(self.rows)
            if not r.done and len(r.tokens) < r.job.params.min_tokens
        ]
        if not held or not self.m.eos_ids:
            return scores
        torch = self.m.torch
        rows = torch.tensor(held, device=scores.device).unsqueeze(1)
        eos = torch.tensor(sorted(self.m.eos_ids), device=scores.device)
        scores = scores.clone()  # the logits kept for logprobs stay the model's own
        scores[rows, eos] = float("-inf")
        return scores

    # --- per-row bookkeeping ----------------------------------------------------

    def _advance(self, chosen: list[int]) -> list[Event]:
        events: list[Event] = []
        for row, token in zip(self.rows, chosen, strict=True):
            if row.done:
                continue
            row.tokens.append(token)
            if row.extras.failure is not None:
                row.done = True
                events.append(row_failed(row.job.key, row.extras.failure))
                continue
            reason = self._finish_reason(row, token)
            if reason is not None:
                row.done = True
                events.extend(self._finished(row, reason))
            elif row.job.stream:
                text = decode(self.m.tokenizer, row.tokens, row.job.params.skip_special_tokens)
                new = stream_ready(text, row.sent, self.hold)
                if new:
                    row.sent += new
                    events.append(Chunk(row.job.key, new, len(row.tokens), len(row.input_ids)))
        return events

    def _finish_reason(self, row: Row, token: int) -> str | None:
        params = row.job.params
        if token in self.m.eos_ids and not params.ignore_eos:
            return P.FINISH_STOP
        if params.stop and len(row.tokens) >= params.min_tokens and self._stop_in_tail(row):
            return P.FINISH_STOP
        if len(row.tokens) >= params.max_new_tokens:
            return P.FINISH_LENGTH
        return None

    def _stop_in_tail(self, row: Row) -> bool:
        """A stop string in the last tokens' text, ending past what came before min_tokens."""
        tokens, params = row.tokens, row.job.params
        start = max(0, len(tokens) - self.tail)
        tail = decode(self.m.tokenizer, tokens[start:], params.skip_special_tokens)
        early = params.min_tokens - 1 - start  # tokens of the tail written before min_tokens
        floor = 0
        if early > 0:
            floor = len(
                decode(self.m.tokenizer, tokens[start : start + early], params.skip_special_tokens)
            )
        return find_stop(tail, params.stop, floor) is not None

    def _finished(self, row: Row, reason: str) -> list[Event]:
        tokens, params = row.tokens, row.job.params
        shown = tokens  # an EOS that ended the row is not text (vLLM's, even unskipped)
        if tokens and tokens[-1] in self.m.eos_ids and not params.ignore_eos:
            shown = tokens[:-1]
        ends_with_eos = len(shown) < len(tokens)
        text = decode(self.m.tokenizer, shown, params.skip_special_tokens)
        floor = self._floor(row)
        found = find_stop(text, params.stop, floor) if params.stop else None
        if found is not None:
            text, reason = text_to_stop(text, found, params), P.FINISH_STOP
            tokens = tokens[: tokens_to_stop(self.m.tokenizer, tokens, params, floor)]
            ends_with_eos = False
        events: list[Event] = []
        if row.job.stream and text.startswith(row.sent) and len(text) > len(row.sent):
            new = text[len(row.sent) :]
            events.append(Chunk(row.job.key, new, len(tokens), len(row.input_ids)))
        elif row.job.stream and not text.startswith(row.sent):
            logger.warning("job %d: streamed text is not a prefix of its final text", row.job.key)
        logprobs = text_logprobs(row.extras, len(tokens), ends_with_eos)
        finished = Finished(row.job.key, text, reason, len(row.input_ids), len(tokens), logprobs)
        finished.cached_tokens = row.cached
        events.append(finished)
        return events

    def _floor(self, row: Row) -> int:
        """Characters of the text written before min_tokens: no stop string ends there."""
        early = row.job.params.min_tokens - 1
        if early <= 0 or not row.job.params.stop:
            return 0
        return len(decode(self.m.tokenizer, row.tokens[:early], row.job.params.skip_special_tokens))

    # --- continuous batching ----------------------------------------------------

    def _merge(self, new: DecodeBatch) -> None:
        """Take in the rows of ``new``, a batch one step old (its prefill and first
        token), right-aligned where this batch's columns end (left padding, as a
        static batch has): its pending tokens beside ours, its keys and values just
        before. From the next step they decode together."""
        torch = self.m.torch
        width = new.length  # its prompts' columns + the pending one
        live = [s for s, r in zip(self.starts, self.rows, strict=True) if not r.done]
        drop = min(live, default=self.length)
        if drop < COMPACT_SHARE * self.length:
            drop = 0  # not worth a copy of the cache yet
        shift = max(width - (self.length - drop), 0) - drop
        budget = max(r.job.params.max_new_tokens - len(r.tokens) for r in self.rows + new.rows)
        capacity = max(self.mask.shape[1] + shift, self.length + shift + budget + 1)
        if capacity > self.mask.shape[1]:
            # Room for the next joins too: growing by just what this one needs made
            # every join of a few rows copy the whole cache for a column or two (6
            # relayouts in 6 joins of a shared-prefix run: 7 of its 26 s).
            capacity += min(max(GROW_MIN_COLUMNS, capacity // 8), width)
        if shift or capacity > self.mask.shape[1]:
            self._relayout(shift, capacity)
        end = self.length
        cols = slice(end - width, end)
        for layer, theirs in zip(self.cache.layers, new.cache.layers, strict=True):
            layer.key_buffer = _append_rows(torch, layer.key_buffer, theirs.key_buffer, width, end)
            layer.value_buffer = _append_rows(
                torch, layer.value_buffer, theirs.value_buffer, width, end
            )
            layer._expose()
        extra = len(new.rows)
        mask = self.mask.new_zeros((extra, self.mask.shape[1]))
        mask[:, cols] = new.mask[:, :width]
        sequences = self.sequences.new_full((extra, self.mask.shape[1]), self.m.pad_id)
        sequences[:, cols] = new.sequences[:, :width]
        self.mask = torch.cat([self.mask, mask])
        self.sequences = torch.cat([self.sequences, sequences])
        self.positions = torch.cat([self.positions, new.positions])
        self.starts += [s + end - width for s in new.starts]
        self.shared.extend(new.shared)
        self.rows += new.rows
        self.hold = max(self.hold, new.hold)
        self.tail = self.hold + 9
        self.joined = True

    def _relayout(self, shift: int, capacity: int) -> None:
        """Move every column by ``shift`` (< 0: drop leading columns no row uses, > 0:
        room on the left for a longer prompt) into ``capacity`` columns."""

        def moved(old: Any, fill: int) -> Any:
            shape = list(old.shape)
            axis = 2 if old.dim() == 4 else 1
            shape[axis] = capacity
            out = old.new_empty(shape)
            lo, hi = max(0, -shift), min(old.shape[axis], self.length, capacity - shift)
            start, count = lo + shift, hi - lo
            out.narrow(axis, start, count).copy_(old.narrow(axis, lo, count))
            # Only the columns the copy leaves get the fill: filling the whole new
            # cache first wrote every byte twice.
            out.narrow(axis, 0, start).fill_(fill)
            out.narrow(axis, start + count, capacity - start - count).fill_(fill)
            return out

        for layer in self.cache.layers:
            layer.key_buffer = moved(layer.key_buffer, 0)
            layer.value_buffer = moved(layer.value_buffer, 0)
            layer.length += shift
            layer.capacity = capacity
            layer._expose()
        self.mask = moved(self.mask, 0)
        self.sequences = moved(self.sequences, self.m.pad_id)
        self.length += shift
        self.width += shift
        self.starts = [s + shift for s in self.starts]

    def _compact_if_worth_it(self) -> None:
        gone = sum(1 for r in self.rows if r.done)
        if not gone or gone == len(self.rows) or gone < COMPACT_SHARE * len(self.rows):
            return
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        index = self.m.torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.sequences = self.sequences[index]
        self.positions = self.positions[index]
        self.rows = [self.rows[i] for i in keep]
        self.starts = [self.starts[i] for i in keep]
        self.shared.select(keep)


def _append_rows(torch: Any, ours: Any, theirs: Any, width: int, end: int) -> Any:
    """``ours`` (a cache buffer) with rows appended: ``theirs``' columns up to its
    pending one, placed so that the pending column is ``end - 1``."""
    shape = (theirs.shape[0], ours.shape[1], ours.shape[2], ours.shape[3])
    rows = ours.new_zeros(shape)
    rows[:, :, end - width : end - 1] = theirs[:, :, : width - 1]
    return torch.cat([ours, rows])


# A shared prefix prefilled ahead of the prompts that share it: a row never decoded.
_WARM_PARAMS = SamplingParams(max_new_tokens=1)


def warm_shared_prefixes(model: Model, prefixes: PrefixKV, prompts: list[list[int]]) -> None:
    """Step 1 of ``hf_prefix``: block-aligned prefixes that several of these prompts
    share and the cache lacks, prefilled once each (themselves reusing what is cached)
    and stored, so that the prompts find them."""
    if not prefixes.blocks.capacity_blocks:
        return
    chains = shared_prefixes(prefixes.blocks, prompts)
    if not chains:
        return
    rows = [Row(Job(-1, None, None, _WARM_PARAMS), chain) for chain in chains]
    batch = DecodeBatch(model, rows, None, True, prefixes=prefixes)
    batch._prefill_cached(prefixes, count=False)


def decode(tokenizer: Any, tokens: list[int], skip_special_tokens: bool = True) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens))


def tokens_to_stop(tokenizer: Any, tokens: list[int], params: Any, floor: int = 0) -> int:
    """The fewest leading tokens whose text holds a stop string ending past ``floor``
    characters (binary search)."""
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        text = decode(tokenizer, tokens[:mid], params.skip_special_tokens)
        if find_stop(text, params.stop, floor) is not None:
            hi = mid
        else:
            lo = mid + 1
    return hi


def logits_processors(params: Any) -> Any:
    """The processors generate() would build for these params, in its order; None when
    there are none (greedy without a penalty)."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chain: list[Any] = []
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:
        if params.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            chain.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p=params.top_p))
        if params.min_p:
            chain.append(MinPLogitsWarper(min_p=params.min_p))
    return LogitsProcessorList(chain) if chain else None
