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
    shared = "_shared"
    for options, expected in [
        ({}, hf_kernels.ATTENTION + shared),
        ({"exact": "true"}, "sdpa"),
        ({"share_prefix_kv": "false"}, hf_kernels.ATTENTION),
        ({"fold_gqa": "false", "share_prefix_kv": "false"}, "sdpa"),
        ({"decode_attention": "true"}, hf_kernels.DECODE_ATTENTION + shared),
    ]:
        with loaded_engine(threads="1", dtype="float32", **options) as engine:
            assert engine._loaded().model.config._attn_implementation == expected, options


def test_greedy_output_with_and_without_folding_is_the_same_over_a_cached_prefix() -> None:
    """Rows whose suffixes run over a cached few-shot prefix copied into their rows
    (the folded call) and rows joining: fp32, token for token."""
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
        with loaded_engine(
            threads="2", dtype="float32", batch_size="4", fold_gqa=fold, share_prefix_kv="false"
        ) as eng:
            run(eng, jobs[0])  # caches the prefix: the rest prefill suffixes over it
            results = run(eng, *jobs[1:])
            assert all(r.cached_tokens > 0 for r in results.values())
            texts.append([(results[k].text, results[k].completion_tokens) for k in sorted(results)])
    assert texts[0] == texts[1]


# --- a cached prefix held apart (shared_prefix_forward) -----------------------------


def segments_of(gen: Any, dtype: Any) -> list[hf_kernels.Segment]:
    """Two prefixes of different lengths, held once each: rows 0 and 2 start with the
    first, rows 1 and 4 with the second, row 3 with none."""

    def prefix(tokens: int) -> list[Any]:
        return [torch.randn(KV_HEADS, tokens, DIM, generator=gen).to(dtype)]

    return [
        hf_kernels.Segment(prefix(40), prefix(40), torch.tensor([0, 2])),
        hf_kernels.Segment(prefix(23), prefix(23), torch.tensor([1, 4])),
    ]


def whole_cache_attention(
    query: Any, key: Any, value: Any, mask: Any, segments: list[hf_kernels.Segment]
) -> Any:
    """What each row would get with its prefix copied in front of its own columns:
    the stock SDPA path, a row at a time."""
    outputs = []
    for row in range(query.shape[0]):
        keys, values, own = key[row : row + 1], value[row : row + 1], mask[row : row + 1]
        for s in segments:
            if row in s.rows.tolist():
                keys = torch.cat([s.keys[0].unsqueeze(0), keys], dim=2)
                values = torch.cat([s.values[0].unsqueeze(0), values], dim=2)
                visible = torch.ones((1, 1, own.shape[2], s.keys[0].shape[1]), dtype=torch.bool)
                own = torch.cat([visible, own], dim=3)
        out, _ = stock()(module(), query[row : row + 1], keys, values, own, scaling=DIM**-0.5)
        outputs.append(out)
    return torch.cat(outputs)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize(("length", "columns"), [(1, 30), (1, 1), (9, 12)])
def test_rows_attend_to_their_prefix_held_apart_as_if_it_were_copied_in(
    dtype: str, tolerance: float, length: int, columns: int
) -> None:
    """A decode step (one query token; a row of one own column too) and a prefill of
    suffixes (left padded, causal): every query that is a real token gets what it
    would with its prefix in its own columns."""
    kind = getattr(torch, dtype)
    query, key, value, mask = tensors(5, length, columns, kind)
    mask[:, :, :, -1] = mask[:, :, :, -1] | (length == 1)  # a decode row sees its own token
    gen = torch.Generator().manual_seed(7)
    segments = segments_of(gen, kind)
    layer = SimpleNamespace(layer_idx=0, **vars(module()))
    forward = hf_kernels.shared_prefix_forward(torch, stock())
    with hf_kernels.attending_to(segments):
        got, _ = forward(layer, query, key, value, mask, scaling=DIM**-0.5)
    expected = whole_cache_attention(query, key, value, mask, segments)
    real = mask[:, 0].any(-1)  # (rows, length): queries that are tokens, not padding
    assert got.shape == expected.shape == (5, length, HEADS, DIM)
    assert got.dtype == kind
    difference = (got.float() - expected.float()).abs()[real]
    assert difference.max().item() <= tolerance


def test_without_segments_everything_goes_to_the_path_it_wraps() -> None:
    query, key, value, mask = tensors(3, 1, 20, torch.float32)
    calls: list[int] = []

    def fallback(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return stock()(*args, **kwargs)

    layer = SimpleNamespace(layer_idx=0, **vars(module()))
    forward = hf_kernels.shared_prefix_forward(torch, fallback)
    forward(layer, query, key, value, mask)
    with hf_kernels.attending_to([]):
        forward(layer, query, key, value, mask)
    assert calls == [1, 1]


def test_a_held_apart_prefix_with_an_attention_it_cannot_serve_is_an_error() -> None:
    """Its rows lack their prefix's columns: falling back would be silently wrong."""
    query, key, value, mask = tensors(2, 1, 20, torch.float32)
    forward = hf_kernels.shared_prefix_forward(torch, stock())
    gen = torch.Generator().manual_seed(3)
    segment = hf_kernels.Segment(
        [torch.randn(KV_HEADS, 16, DIM, generator=gen)],
        [torch.randn(KV_HEADS, 16, DIM, generator=gen)],
        torch.tensor([0]),
    )
    with hf_kernels.attending_to([segment]), pytest.raises(RuntimeError, match="layer_idx"):
        forward(module(), query, key, value, mask)  # no layer_idx
    layer = SimpleNamespace(layer_idx=0, **vars(module()))
    with hf_kernels.attending_to([segment]), pytest.raises(RuntimeError, match="softcap"):
        forward(layer, query, key, value, mask, softcap=30.0)
