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

from exgen.daemon.engines.base import PromptLogprob, TokenLogprob


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


def prompt_logprob_entries(
    torch: Any, logits: Any, ids: list[int], top: int, piece: Callable[[int], str]
) -> list[PromptLogprob]:
    """[id, text, logprob, rank, [[alt id, alt text, logprob]...]] for each prompt token,
    from the prefill's logits (row t predicts token t + 1); the first token has no
    logprob (None: nothing precedes it). ``rank``: 1 + the tokens more likely than it."""
    first = [ids[0], piece(ids[0]), None, None, []]
    if len(ids) == 1:
        return [first]
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    index = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, index)
    ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
    alternatives: list[list[list[Any]]] = [[] for _ in ids[1:]]
    if top:
        values, indices = logprobs.topk(top, dim=-1)
        alternatives = [
            [[t, piece(t), v] for t, v in zip(row_ids, row_values, strict=True)]
            for row_ids, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    rows = zip(ids[1:], chosen.squeeze(1).tolist(), ranks, alternatives, strict=True)
    return [first] + [[t, piece(t), lp, rank, alts] for t, lp, rank, alts in rows]
