"""The transformers engine's prefix cache, on the real demo model in fp32.

Greedy output with the cache must equal output without it, token for token: prompts
that share a long few-shot prefix (after the chat template) and differ after it, of
different lengths, batched; prompts that share only part of it; a later batch that
finds the prefix cached by an earlier one; and a cache too small to hold it all.
Every test also checks that the cache was used, so none passes without it. Each
runs twice: with cached prefixes held apart, once for the rows that share them (the
default), and copied into every row.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exgen.daemon.engines.base import Finished, Job, SamplingParams
from exgen.daemon.engines.hf import TransformersEngine
from exgen.daemon.engines.hf_decode import HELD_APART_GRID, MAX_SEGMENTS
from tests.unit.engines.hf_support import direct_generate, run

pytest.importorskip("transformers")

FEW_SHOT = " ".join(
    f"Question: what is {a} plus {b}? Answer: {a + b}."
    for a, b in [(2, 3), (10, 7), (4, 4), (21, 9), (6, 13), (8, 8), (30, 12), (5, 1)]
)
SYSTEM = {"role": "system", "content": "You answer arithmetic questions. " + FEW_SHOT}
QUESTIONS = [
    "what is 3 plus 4?",
    "what is 12 plus 30, and why is the answer even?",
    "what is 7 plus 7?",
    "Please tell me: what is 100 plus 250? Show the steps one by one.",
    "what is 1 plus 1?",
]
NEW = 10


def chat(question: str, system: dict[str, str] = SYSTEM) -> list[dict[str, str]]:
    return [system, {"role": "user", "content": question}]


def fp32(**options: str) -> TransformersEngine:
    eng = TransformersEngine(
        None, {"threads": "2", "batch_size": "8", "dtype": "float32", **options}
    )
    eng.load()
    return eng


@pytest.fixture(scope="module", params=["true", "false"], ids=["held-apart", "copied"])
def cached(request: pytest.FixtureRequest) -> Iterator[TransformersEngine]:
    """The cache both ways: a cached prefix held once, apart from the rows that share
    it (the default on CPU), and copied into each row."""
    eng = fp32(share_prefix_kv=request.param)
    assert eng.describe()["shared_prefix_kv"] == (request.param == "true")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def uncached() -> Iterator[TransformersEngine]:
    eng = fp32(prefix_cache_tokens="0")
    yield eng
    eng.close()


def jobs_of(messages: list[list[dict[str, str]]], first_key: int = 0) -> list[Job]:
    params = SamplingParams(max_new_tokens=NEW)
    return [Job(first_key + i, None, m, params) for i, m in enumerate(messages)]


def tokens_of(results: dict[int, Finished]) -> list[tuple[str, int]]:
    return [(results[k].text, results[k].completion_tokens) for k in sorted(results)]


def test_a_shared_prefix_is_prefilled_once_and_output_is_unchanged(
    cached: TransformersEngine, uncached: TransformersEngine
) -> None:
    jobs = jobs_of([chat(q) for q in QUESTIONS])
    before = cached.counters()
    with_cache = run(cached, *jobs)
    assert tokens_of(with_cache) == tokens_of(run(uncached, *jobs))
    # Every row reused the few-shot system prompt (all but a few blocks of it at least:
    # a row prefills as many columns as the longest uncached rest in its group).
    prefix = len(cached._encode(Job(0, None, chat(""), SamplingParams()))) - 64
    assert all(r.cached_tokens >= prefix for r in with_cache.values())
    after = cached.counters()
    assert after["prefix_hits"] - before["prefix_hits"] == len(jobs)
    saved = sum(r.cached_tokens for r in with_cache.values())
    assert after["prefill_tokens_saved"] - before["prefill_tokens_saved"] == saved
    assert uncached.counters() == {}
    assert all(r.cached_tokens == 0 for r in run(uncached, *jobs).values())


def test_output_equals_plain_generate_one_prompt_at_a_time(cached: TransformersEngine) -> None:
    jobs = jobs_of([chat(q) for q in QUESTIONS[:3]], first_key=100)
    results = run(cached, *jobs)
    for j in jobs:
        assert (results[j.key].text, results[j.key].completion_tokens) == direct_generate(cached, j)
        assert results[j.key].cached_tokens > 0


def test_a_later_batch_reuses_what_an_earlier_one_cached(
    cached: TransformersEngine, uncached: TransformersEngine
) -> None:
    run(cached, *jobs_of([chat("what is 9 plus 9?")], first_key=200))  # alone: stores it
    later = jobs_of([chat("what is 2 plus 40?")], first_key=300)
    result = run(cached, *later)[300]
    assert result.cached_tokens > 0
    assert tokens_of({300: result}) == tokens_of(run(uncached, *later))


def test_rows_sharing_only_part_of_the_prefix_and_rows_sharing_none(
    cached: TransformersEngine, uncached: TransformersEngine
) -> None:
    half = {"role": "system", "content": SYSTEM["content"][: len(SYSTEM["content"]) // 2]}
    other = {"role": "system", "content": "You are a poet. " + FEW_SHOT[::-1]}
    messages = [
        chat("what is 3 plus 3?", half),
        chat("what is 5 plus 8?", half),
        chat("what is 2 plus 2?"),
        chat("Write a line about rain.", other),
        [{"role": "user", "content": "The capital of France is"}],
    ]
    jobs = jobs_of(messages, first_key=400)
    results = run(cached, *jobs)
    assert tokens_of(results) == tokens_of(run(uncached, *jobs))
    full = results[402].cached_tokens
    assert 0 < results[400].cached_tokens < full and results[401].cached_tokens > 0
    assert results[403].cached_tokens == 0 and results[404].cached_tokens == 0


def test_a_cache_smaller_than_the_prefix_still_gives_the_same_output(
    uncached: TransformersEngine,
) -> None:
    small = fp32(prefix_cache_tokens="64")
    try:
        jobs = jobs_of([chat(q) for q in QUESTIONS[:3]], first_key=500)
        results = run(small, *jobs)
        assert tokens_of(results) == tokens_of(run(uncached, *jobs))
        assert small.describe()["prefix_cache_tokens"] == 64
        assert small._prefixes is not None and small._prefixes.blocks.tokens <= 64
        assert any(r.cached_tokens for r in results.values())
    finally:
        small.close()


def test_n_samples_of_one_prompt_share_its_cached_prefix(
    cached: TransformersEngine, uncached: TransformersEngine
) -> None:
    run(cached, *jobs_of([chat("what is 9 plus 9?")], first_key=599))  # caches the prefix
    params = SamplingParams(max_new_tokens=NEW, n=2)
    job = Job(600, None, chat("what is 6 plus 6?"), params)
    with_cache = run(cached, job)[600]
    without = run(uncached, Job(600, None, chat("what is 6 plus 6?"), params))[600]
    assert with_cache.choices is not None and without.choices is not None
    assert [c.text for c in with_cache.choices] == [c.text for c in without.choices]
    assert with_cache.cached_tokens > 0 and without.cached_tokens == 0


def test_rows_that_join_and_leave_a_batch_keep_their_prefix(
    cached: TransformersEngine, uncached: TransformersEngine
) -> None:
    """More prompts than the batch holds, ending at different steps: rows leave the
    batch (its cache compacted) and waiting ones join it, each with the prefix it
    holds, mixed with rows that hold none."""
    messages = [chat(f"what is {i} plus {2 * i}?") for i in range(11)]
    messages.append([{"role": "user", "content": "The capital of France is"}])
    jobs = [
        Job(700 + i, None, m, SamplingParams(max_new_tokens=3 + 2 * (i % 5), ignore_eos=True))
        for i, m in enumerate(messages)
    ]
    before = cached.counters()["prefix_hits"]
    results = run(cached, *jobs)
    assert tokens_of(results) == tokens_of(run(uncached, *jobs))
    assert cached.counters()["prefix_hits"] - before >= len(jobs) - 1  # France: maybe


def test_a_batch_holds_a_shared_prefix_once() -> None:
    """With the prefix held apart, the batch's own columns are only what follows it;
    the rows that share it form one segment of the attention."""
    engine = fp32()
    try:
        run(engine, *jobs_of([chat("what is 9 plus 9?")], first_key=800))  # caches the prefix
        jobs = jobs_of([chat(q) for q in QUESTIONS], first_key=810)
        for j in jobs:
            engine.add(j)
        engine.step()  # the prefill
        batch = engine._batch
        assert batch is not None
        prompt = len(engine._encode(jobs[0]))
        assert batch.width < prompt - 64
        # One segment, though the "what is" questions' cached chains are a block
        # longer (cached by the first job) than the other question's: the head held
        # apart is cut to whole grids of blocks, the rest copied into each row.
        segments = [s.rows.tolist() for s in batch.shared.segments()]
        assert segments == [list(range(len(jobs)))]
        head = batch.shared.heads[0]
        assert head is not None and head[0][0].shape[1] % (HELD_APART_GRID * 16) == 0
        while engine.pending:
            engine.step()
    finally:
        engine.close()


def test_a_prompt_whose_prefix_was_not_cached_is_held_apart_after_its_prefill(
    uncached: TransformersEngine,
) -> None:
    """The first prompt of a new prefix prefills it whole; then it holds it apart like
    the rows that join later, so the batch does not stay as wide as its prompt."""
    system = {"role": "system", "content": "You add numbers, tersely. " + FEW_SHOT[::-1]}
    engine = fp32(batch_size="4")
    try:
        first = jobs_of([chat("what is 4 plus 4?", system)], first_key=900)[0]
        engine.add(first)
        engine.step()  # its prefill
        batch = engine._batch
        assert batch is not None
        assert batch.width < len(engine._encode(first)) - 64
        assert [s.rows.tolist() for s in batch.shared.segments()] == [[0]]
        later = jobs_of([chat(q, system) for q in QUESTIONS[:3]], first_key=901)
        for j in later:
            engine.add(j)
        events = []
        while engine.pending:
            events.extend(engine.step())
        results = {e.key: e for e in events if isinstance(e, Finished)}
        assert len(batch.shared.segments()) == 1  # the joined rows share its segment
        expected = run(uncached, *later)
        assert tokens_of({k: results[k] for k in expected}) == tokens_of(expected)
    finally:
        engine.close()


def test_a_batch_of_unrelated_long_prompts_keeps_them_in_its_columns() -> None:
    """More distinct prefixes than MAX_SEGMENTS: each would be a segment of its own."""
    engine = fp32(batch_size="16")
    try:
        systems = [
            {"role": "system", "content": f"Persona {i}. " + FEW_SHOT[i:] + FEW_SHOT[:i]}
            for i in range(MAX_SEGMENTS + 1)
        ]
        jobs = jobs_of([chat("hi", s) for s in systems], first_key=950)
        for j in jobs:
            engine.add(j)
        engine.step()
        batch = engine._batch
        assert batch is not None and not batch.shared.segments()
        assert batch.width >= min(len(engine._encode(j)) for j in jobs)
        prefixes = engine._prefixes
        assert prefixes is not None and not prefixes._joined, "heads joined for nothing"
        while engine.pending:
            engine.step()
    finally:
        engine.close()
