"""Log probabilities of generated tokens, from logits: shared by the engines that see
the model's logits (transformers, ExLlamaV2).

The values are those of the model's own distribution: a float32 log-softmax of the
logits before temperature, top-k/top-p and the grammar's mask (vLLM's default), so
greedy and sampled runs report the same numbers for the same tokens. torch is passed
in: this module is imported where torch may not be installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exgen.daemon.engines.base import TokenLogprob


def logprob_entries(
    torch: Any, logits: Any, ids: list[int], top: int, piece: Callable[[int], str]
) -> list[TokenLogprob]:
    """[token, logprob, [[alt, logprob]...]] for each chosen id, from its row of
    ``logits`` (rows x vocab); ``top`` alternatives, best first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(ids, dtype=torch.long, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    if top:
        values, indices = logprobs.topk(top, dim=-1)
        alternatives = [
            [[piece(t), v] for t, v in zip(row_ids, row_values, strict=True)]
            for row_ids, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    else:
        alternatives = [[] for _ in ids]
    return [[piece(t), lp, alts] for t, lp, alts in zip(ids, chosen, alternatives, strict=True)]
