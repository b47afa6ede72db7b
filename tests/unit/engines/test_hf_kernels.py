"""The transformers engine's own attention (hf_kernels): grouped-query heads folded
into the query length for a query much shorter than its keys.

The folded call must give what transformers' SDPA path gives (which copies every key
and value once per query head first), on random tensors and on the demo model; it
must hand every other call to the path it wraps; and the engine must use it by
default, and not with ``exact=true`` or ``fold_gqa=false``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from exgen.daemon.engines.base import Job, SamplingParams
from tests.unit.engines.hf_support import loaded_engine, run

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exgen.daemon.engines import hf_kernels  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64  # the demo model's attention


def module() -> Any:
    """What transformers' SDPA path reads of an attention layer."""
    return SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False)


def tensors(rows: int, length: int, columns: int, dtype: Any) -> tuple[Any, ...]:
    """A query of ``length`` tokens at the end of ``columns`` keys, each row left
    padded by a different amount, causal: the mask transformers builds for a batch."""
    gen = torch.Generator().manual_seed(rows * 1000 + length)
    query = torch.randn(rows, HEADS, length, DIM, generator=gen).to(dtype)
    key = torch.randn(rows, KV_HEADS, columns, DIM, generator=gen).to(dtype)
    value = torch.randn(rows, KV_HEADS, columns, DIM, generator=gen).to(dtype)
    positions = torch.arange(columns)
    causal = positions[None, :] <= positions[columns - length :, None]
    pads = torch.arange(rows) * 3
    unpadded = positions[None, :] >= pads[:, None]
    mask = (causal[None, :, :] & unpadded[:, None, :])[:, None]  # (rows, 1, length, columns)
    return query, key, value, mask


def stock() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("rows", "length", "columns"), [(4, 7, 80), (1, 12, 300), (5, 1 + 31, 575)]
)
def test_a_folded_query_gives_what_the_stock_path_gives(
    dtype: str, rows: int, length: int, columns: int
) -> None:
    query, key, value, mask = tensors(rows, length, columns, getattr(torch, dtype))
    calls: list[int] = []

    def fallback(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return stock()(*args, **kwargs)

    folded, _ = hf_kernels.folded_gqa_forward(torch, fallback)(
        module(), query, key, value, mask, scaling=DIM**-0.5
    )
    expected, _ = stock()(module(), query, key, value, mask, scaling=DIM**-0.5)
    assert not calls, "the folded path was not taken"
    assert folded.shape == expected.shape == (rows, length, HEADS, DIM)
    assert torch.equal(folded, expected)


@pytest.mark.parametrize(
    ("rows", "length", "columns", "why"),
    [
        (4, 1, 80, "a decode step: transformers folds it itself"),
        (2, 60, 64, "a prompt prefilled whole"),
    ],
)
def test_other_calls_go_to_the_path_it_wraps(
    rows: int, length: int, columns: int, why: str
) -> None:
    query, key, value, mask = tensors(rows, length, columns, torch.float32)
    calls: list[int] = []

    def fallback(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return stock()(*args, **kwargs)

    hf_kernels.folded_gqa_forward(torch, fallback)(module(), query, key, value, mask)
    hf_kernels.folded_gqa_forward(torch, fallback)(module(), query, key, value, None)
    assert calls == [1, 1], why


def test_the_engine_folds_by_default_and_not_when_exact() -> None:
    for options, expected in [
        ({}, hf_kernels.ATTENTION),
        ({"exact": "true"}, "sdpa"),
        ({"fold_gqa": "false"}, "sdpa"),
        ({"decode_attention": "true"}, hf_kernels.DECODE_ATTENTION),
    ]:
        with loaded_engine(threads="1", dtype="float32", **options) as engine:
            assert engine._loaded().model.config._attn_implementation == expected, options


def test_greedy_output_with_and_without_folding_is_the_same_over_a_cached_prefix() -> None:
    """Rows whose suffixes run over a cached few-shot prefix (the folded call) and
    rows joining: fp32, token for token."""
    system = {
        "role": "system",
        "content": "Answer briefly. "
        + " ".join(f"Q: {a} plus {a + 3}? A: {2 * a + 3}." for a in range(2, 30)),
    }
    questions = [
        "what is 2 plus 2?",
        "what is 40 plus 2, and is it even?",
        "name a colour.",
        "what is 7 plus 8? Say it in words, then in digits.",
        "hi",
        "what is 11 plus 12?",
    ]
    params = SamplingParams(max_new_tokens=8)
    jobs = [
        Job(i, None, [system, {"role": "user", "content": q}], params)
        for i, q in enumerate(questions)
    ]
    texts = []
    for fold in ("true", "false"):
        with loaded_engine(threads="2", dtype="float32", batch_size="4", fold_gqa=fold) as eng:
            run(eng, jobs[0])  # caches the prefix: the rest prefill suffixes over it
            results = run(eng, *jobs[1:])
            assert all(r.cached_tokens > 0 for r in results.values())
            texts.append([(results[k].text, results[k].completion_tokens) for k in sorted(results)])
    assert texts[0] == texts[1]
