"""The transformers engine's own CPU kernels (not with ``exact=true``).

Linear layers with their weights prepacked once, at load, into oneDNN's blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does
on CPU) and run by oneDNN's matrix product (``_linear_pointwise``), where the stock
``nn.Linear`` hands MKL the plain weight every call. Measured on the demo model's
shapes in bf16, one thread, a Zen 4 core shared with other work (best of 5 rounds
of 20 calls each, interleaved): 1.3-2.1x faster at 1-64 rows, the 49152-wide
output layer about 2x; the same products to the last bit on random data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def make_packed_linear_class(torch: Any) -> type:
    class PackedLinear(torch.nn.Module):
        """``nn.Linear``'s product with the weight in oneDNN's layout."""

        def __init__(self, linear: Any, keep_weight: bool) -> None:
            super().__init__()
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            weight = linear.weight.detach()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.bias = None if linear.bias is None else linear.bias.detach()
            if keep_weight:  # the output embeddings: read for their shape, tied to the input
                self.weight = linear.weight

        def forward(self, x: Any) -> Any:
            flat = x.reshape(-1, self.in_features)
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
            return out.view(*x.shape[:-1], self.out_features)

    return PackedLinear


def usable(torch: Any, dtype: Any) -> bool:
    """Whether this torch build runs oneDNN's prepacked linear in ``dtype``."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        weight = torch.ones((4, 8), dtype=dtype)
        packed = ops._reorder_linear_weight(weight, None)
        out = ops._linear_pointwise(torch.ones((2, 8), dtype=dtype), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return bool((out == 8).all())


def prepack_linears(torch: Any, model: Any, dtype: Any) -> int:
    """Replace the model's ``nn.Linear`` layers by prepacked ones (in place, under
    inference only: the packed weights are not parameters). Returns how many."""
    if not usable(torch, dtype):
        logger.info("oneDNN prepacked linear unavailable for %s: stock kernels", dtype)
        return 0
    packed_class = make_packed_linear_class(torch)
    output = model.get_output_embeddings()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.device.type == "cpu":
                setattr(parent, name, packed_class(child, child is output))
                replaced += 1
    return replaced


ATTENTION = "exgen_sdpa"
DECODE_ATTENTION = "exgen_decode"


def folded_gqa_forward(torch: Any, fallback: Any) -> Any:
    """An attention function for transformers' AttentionInterface: a query of several
    tokens much shorter than its keys (a prompt's suffix over a cached prefix, rows
    joining a batch) runs SDPA on the key/value heads as they are, each key/value
    head's query heads folded into the query length, where transformers' SDPA path
    copies every key and value once per query head (``repeat_kv``) first. The same
    products in the same order: equal output (tests/unit/engines/test_hf_kernels.py).
    Measured (bf16, one thread, 20 rows of a 31-token suffix over 575 columns):
    6.6 ms a layer against 14.4. Anything else goes to ``fallback``: decode steps
    (transformers folds those itself), and a prompt prefilled whole, where folding
    measured no faster (a query as long as its keys reads them once per head anyway)."""

    def forward(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        batch, heads, length, dim = query.shape
        kv_heads, columns = key.shape[1], key.shape[2]
        if (
            length == 1
            or 2 * length > columns
            or kv_heads == heads
            or attention_mask is None
            or attention_mask.dtype != torch.bool
            or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None
        ):
            return fallback(
                module, query, key, value, attention_mask,
                dropout=dropout, scaling=scaling, **kwargs,
            )  # fmt: skip
        group = heads // kv_heads
        # query (b, kv*group, L, d) is (b, kv, group*L, d) as laid out: no copy.
        folded = query.reshape(batch, kv_heads, group * length, dim)
        mask = attention_mask.expand(batch, 1, length, columns)
        mask = mask[:, :, None].expand(batch, 1, group, length, columns)
        out = torch.nn.functional.scaled_dot_product_attention(
            folded,
            key,
            value,
            attn_mask=mask.reshape(batch, 1, group * length, columns),
            dropout_p=dropout,
            scale=scaling,
        )
        return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None

    return forward


def decode_attention_forward(torch: Any, fallback: Any) -> Any:
    """An attention function for transformers' AttentionInterface: a one-token query
    (a decode step) as two batched products per layer over the cache as it lies, the
    query heads of a key/value head side by side (no repeated keys); anything else
    (the prefill) goes to ``fallback`` (transformers' SDPA path)."""

    def forward(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        if query.shape[2] != 1 or (
            attention_mask is not None and attention_mask.dtype != torch.bool
        ):
            return fallback(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                **kwargs,
            )
        batch, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
        scale = scaling if scaling is not None else dim**-0.5
        scores = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)  # (b, kv, group, t)
        if attention_mask is not None:  # (b, 1, 1, t): True where a row may attend
            scores.masked_fill_(~attention_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        out = torch.matmul(probs, value)  # (b, kv, group, dim)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2), None

    return forward


@dataclass(frozen=True, slots=True)
class Segment:
    """A prefix's keys and values, stored once, and the rows of a batch that start with
    it: per layer (kv_heads, tokens, head_dim) tensors; ``rows``: an index tensor."""

    keys: Sequence[Any]
    values: Sequence[Any]
    rows: Any


@dataclass(slots=True)
class _Pass:
    """The forward pass under way (``attending_to``): its segments, and the additive
    mask its layers share (transformers hands every layer the same mask object, so it
    is converted once a pass, not once a layer)."""

    segments: Sequence[Segment]
    made: bool = False
    mask_from: Any = None
    mask: Any = None

    def additive_mask(self, torch: Any, mask: Any, query: Any, columns: int) -> Any:
        if not self.made or self.mask_from is not mask:
            self.mask = _additive_mask(torch, mask, query, columns)
            self.mask_from, self.made = mask, True
        return self.mask


_PASS: ContextVar[_Pass | None] = ContextVar("exgen_forward_pass", default=None)


@contextmanager
def attending_to(segments: Sequence[Segment]) -> Iterator[None]:
    """Within it (one forward pass), ``shared_prefix_forward`` adds each segment's keys
    and values before its rows' own (a batch whose rows hold only their suffixes)."""
    token = _PASS.set(_Pass(segments) if segments else None)
    try:
        yield
    finally:
        _PASS.reset(token)


def shared_prefix_forward(torch: Any, fallback: Any) -> Any:
    """An attention function for transformers' AttentionInterface: while
    ``attending_to`` holds segments, each row attends to its segment's keys (one
    copy, shared by its rows) and then to its own columns, the two softmax parts merged
    by their log-sum-exps (cascade attention). The shared part runs as one product per
    segment, every query of its rows against the prefix read once, where a cache with
    the prefix copied into each row reads it once per row: measured at 64 rows of 8
    prefixes of 610 tokens (bf16, one thread), 2.2 ms a layer against 3.8. Without
    segments, everything goes to ``fallback``."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def forward(
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[Any, None]:
        forward_pass = _PASS.get()
        if forward_pass is None:
            return fallback(
                module, query, key, value, attention_mask,
                dropout=dropout, scaling=scaling, **kwargs,
            )  # fmt: skip
        layer = getattr(module, "layer_idx", None)
        if layer is None or query.device.type != "cpu" or kwargs.get("softcap") is not None:
            # The rows' columns lack their prefixes: any other path would be wrong.
            raise RuntimeError(
                f"{type(module).__name__}: a prefix held apart needs a CPU attention "
                "layer with a layer_idx and no softcap; use share_prefix_kv=false"
            )
        mask = forward_pass.additive_mask(torch, attention_mask, query, key.shape[2])
        own, own_lse = flash(query, key, value, 0.0, False, attn_mask=mask, scale=scaling)
        # Every segment's part into one tensor, then one merge for all rows (a row
        # without a segment: its shared part weighs exp(-inf) = 0); merging each
        # segment apart cost 9 small ops a segment, layer and step.
        shared = own.new_zeros(own.shape, dtype=torch.float32)
        shared_lse = torch.full_like(own_lse, float("-inf"))
        for segment in forward_pass.segments:
            part, part_lse = _attend_shared(
                flash, query.index_select(0, segment.rows), segment.keys[layer],
                segment.values[layer], scaling,
            )  # fmt: skip
            shared.index_copy_(0, segment.rows, part)
            shared_lse.index_copy_(0, segment.rows, part_lse)
        top = torch.maximum(own_lse, shared_lse)
        own_w = (own_lse - top).exp_().unsqueeze(-1)
        shared_w = (shared_lse - top).exp_().unsqueeze(-1)
        out = shared.mul_(shared_w).add_(own.float().mul_(own_w)).div_(own_w.add_(shared_w))
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return forward


def _additive_mask(torch: Any, mask: Any, query: Any, columns: int) -> Any:
    """The flash kernel's mask: additive, of the query's dtype; transformers' boolean
    one (True: may attend), or a causal one where it gave none."""
    length = query.shape[2]
    if mask is None:
        if length == 1:
            return None
        cols = torch.arange(columns, device=query.device)
        mask = cols[None, :] <= cols[columns - length :, None]
    if mask.dtype != torch.bool:
        return mask.to(query.dtype)
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
        ~mask, float("-inf")
    )


def _attend_shared(
    flash: Any, query: Any, keys: Any, values: Any, scaling: float | None
) -> tuple[Any, Any]:
    """Rows' queries (n, heads, L, d) against one prefix's keys and values (kv_heads,
    P, d), no mask: every query of a key/value head folded into one long query, so
    the prefix is read once. Returns the output (n, heads, L, d, fp32) and the
    log-sum-exp (n, heads, L)."""
    n, heads, length, dim = query.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    folded = query.reshape(n, kv_heads, group * length, dim).transpose(0, 1)
    folded = folded.reshape(1, kv_heads, n * group * length, dim)
    out, lse = flash(folded, keys.unsqueeze(0), values.unsqueeze(0), 0.0, False, scale=scaling)
    out = out.view(kv_heads, n, group * length, dim).transpose(0, 1)
    lse = lse.view(kv_heads, n, group * length).transpose(0, 1)
    return out.reshape(n, heads, length, dim).float(), lse.reshape(n, heads, length)


def layers_indexed(model: Any) -> bool:
    """Whether every attention layer (a ``self_attn`` module, transformers' name for
    it) knows its index, which ``shared_prefix_forward`` needs to find its layer's
    part of a prefix held apart."""
    layers = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    return bool(layers) and all(isinstance(getattr(m, "layer_idx", None), int) for m in layers)


def use_attention(
    torch: Any, model: Any, fold_gqa: bool, decode: bool, share_prefix: bool = False
) -> str | None:
    """Switch the model's attention to the engine's (SDPA's masks): ``fold_gqa``:
    ``folded_gqa_forward`` before transformers' SDPA path; ``decode``:
    ``decode_attention_forward`` for decode steps; ``share_prefix``:
    ``shared_prefix_forward`` around them. Returns the implementation's name, or None
    (stock SDPA) where none is asked for or this transformers lacks the interfaces."""
    if not (fold_gqa or decode or share_prefix):
        return None
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return None
    forward = sdpa_attention_forward
    if fold_gqa:
        forward = folded_gqa_forward(torch, forward)
    name = ATTENTION
    if decode:
        forward, name = decode_attention_forward(torch, forward), DECODE_ATTENTION
    if share_prefix:
        forward, name = shared_prefix_forward(torch, forward), name + "_shared"
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError) as exc:
        logger.info("the engine's attention not used: %s", exc)
        return None
    return name
