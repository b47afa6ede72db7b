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
