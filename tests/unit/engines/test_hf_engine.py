"""The transformers engine in-process, with the real demo model (SmolLM2-135M, CPU),
in the exact mode (``exact=true``): the stock kernels, held to equality. The default
path is held to the field's bar instead (test_hf_quality.py).

The model loads once for the module in the dtype the engine picks here (bf16 on a
CPU with native bf16) and once in fp32; every generation here is short.

Equality with plain transformers: in fp32 a row's greedy output is the same
whatever else is in the batch, so the reference is one prompt at a time. In bf16 it
is not, in plain transformers either (oneDNN's bf16 matrix product for one row
rounds differently from the one for several: 5 of 15 seed prompts diverge within
30 tokens between a padded batch and one at a time), so the reference is
``generate`` on the same left-padded batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from exgen.client import protocol as P
from exgen.daemon.cpu_layout import cpu_flags, native_bf16
from exgen.daemon.engines.base import (
    Chunk,
    EngineOptionError,
    EngineUnavailable,
    Event,
    Finished,
    Job,
    JobRejected,
    SamplingParams,
)
from exgen.daemon.engines.hf import TransformersEngine, kv_bytes_per_token, kv_token_budget
from exgen.daemon.engines.hf_decode import prefill_groups, stream_ready
from tests.unit.engines.hf_support import direct_generate, loaded_engine, run

pytest.importorskip("transformers")

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine() -> Iterator[TransformersEngine]:
    with loaded_engine(threads="2", batch_size="8", exact="true") as eng:
        yield eng


@pytest.fixture(scope="module")
def fp32_engine() -> Iterator[TransformersEngine]:
    with loaded_engine(threads="2", batch_size="8", dtype="float32", exact="true") as eng:
        yield eng


def job(
    key: int,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    stream: bool = False,
    **params: Any,
) -> Job:
    return Job(key, prompt, messages, SamplingParams(**params), stream)


def direct_generate_batch(engine: TransformersEngine, prompts: list[str], new: int) -> list[str]:
    """Plain transformers: the prompts as one left-padded batch, model.generate, greedy."""
    import torch

    state = engine._loaded()
    tokenizer, model = state.tokenizer, state.model
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=state.pad_id)
    width = enc["input_ids"].shape[1]
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


SEED_PROMPTS = [
    'I would like to tell you about the best first line of a book: "Call me Ishmael." '
    "(Moby-Dick, Herman Melville). Why does it work so well?",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Write a limerick about a cat.",
    "The three primary colours are",
]


def test_describe(engine: TransformersEngine) -> None:
    facts = engine.describe()
    assert facts["model"] == "smollm2-135m-instruct"
    native = native_bf16(cpu_flags())
    assert facts["dtype"] == ("bfloat16" if native else "float32") and facts["devices"] == ["cpu"]
    assert facts["max_seq_len"] == engine.max_seq_len == 8192
    assert facts["mode"] == "static" and facts["exact"] is True
    assert engine.capacity == 8


def test_chat_knows_the_capital_of_france(engine: TransformersEngine) -> None:
    result = run(engine, job(1, messages=CAPITAL, max_new_tokens=16))[1]
    assert "Paris" in result.text
    assert result.prompt_tokens > 10 and result.completion_tokens > 0


def test_greedy_batch_equals_direct_generate_of_the_same_batch(
    engine: TransformersEngine,
) -> None:
    jobs = [job(i, prompt=p, max_new_tokens=30) for i, p in enumerate(SEED_PROMPTS)]
    results = run(engine, *jobs)  # one batch, prefilled in groups of similar length
    expected = direct_generate_batch(engine, SEED_PROMPTS, 30)
    assert [results[j.key].text for j in jobs] == expected


def test_greedy_fp32_batch_equals_one_prompt_at_a_time(fp32_engine: TransformersEngine) -> None:
    jobs = [
        job(1, prompt="The capital of France is", max_new_tokens=12),
        job(2, prompt="def fibonacci(n):", max_new_tokens=12),
        job(3, messages=CAPITAL, max_new_tokens=12),
        job(
            4,
            messages=[{"role": "user", "content": "Write a limerick about a cat."}],
            max_new_tokens=12,
        ),
    ]
    results = run(fp32_engine, *jobs)  # one left-padded batch of prompts of unequal length
    for j in jobs:
        text, count = direct_generate(fp32_engine, j)
        assert results[j.key].text == text
        assert results[j.key].completion_tokens == count


def test_max_new_tokens_finishes_with_length(engine: TransformersEngine) -> None:
    result = run(engine, job(1, prompt="Once upon a time", max_new_tokens=5))[1]
    assert result.finish_reason == P.FINISH_LENGTH
    assert result.completion_tokens == 5


def test_eos_finishes_with_stop(engine: TransformersEngine) -> None:
    messages = [{"role": "user", "content": "Say hi."}]
    result = run(engine, job(1, messages=messages, max_new_tokens=40))[1]
    assert result.finish_reason == P.FINISH_STOP
    assert result.completion_tokens < 40
    assert "<|im_end|>" not in result.text


def test_stop_string_truncates_and_stops_early(engine: TransformersEngine) -> None:
    before = engine.decode_steps
    results = run(
        engine,
        job(1, prompt="1, 2, 3, 4,", max_new_tokens=30, stop=[" 7", "zzz"]),
        job(2, prompt="1, 2, 3, 4,", max_new_tokens=10),
    )
    assert results[1].text == " 5, 6,"
    assert results[1].finish_reason == P.FINISH_STOP
    # Counted up to the token that completed the stop string.
    tokenizer = engine._loaded().tokenizer
    assert results[1].completion_tokens == len(tokenizer(" 5, 6, 7")["input_ids"])
    assert results[2].text.startswith(" 5, 6, 7")
    assert engine.decode_steps - before <= 11  # the batch ended at the stop, not at 30


def test_too_long_prompt_rejected_others_complete(engine: TransformersEngine) -> None:
    limit = engine.max_seq_len
    assert limit is not None
    with pytest.raises(JobRejected) as caught:
        engine.add(job(1, prompt="word " * (limit + 10), max_new_tokens=4))
    assert caught.value.code == P.E_PROMPT_TOO_LONG
    assert f"max_new_tokens 4 > context {limit}" in caught.value.message
    with pytest.raises(JobRejected) as caught:
        engine.add(job(2, prompt="Hello", max_new_tokens=limit))
    assert caught.value.message == f"prompt is 1 tokens + max_new_tokens {limit} > context {limit}"
    results = run(engine, job(3, prompt="Hello", max_new_tokens=3))
    assert set(results) == {3}


def test_empty_prompt_rejected(engine: TransformersEngine) -> None:
    with pytest.raises(JobRejected) as caught:
        engine.add(job(1, prompt=""))
    assert caught.value.code == P.E_BAD_REQUEST


def test_cancel_drops_a_waiting_job(engine: TransformersEngine) -> None:
    engine.add(job(1, prompt="Hello", max_new_tokens=2))
    engine.add(job(2, prompt="Hi", max_new_tokens=2))
    engine.cancel(1)
    assert engine.pending == 1
    assert set(run(engine)) == {2}


def test_stream_sends_a_chunk_per_step_and_they_join_to_the_text(
    engine: TransformersEngine,
) -> None:
    engine.add(job(1, prompt="Once upon a time", max_new_tokens=20, stream=True))
    engine.add(job(2, prompt="The capital of France is", max_new_tokens=20))
    steps: list[list[Event]] = []
    while engine.pending:
        steps.append(engine.step())
    chunks = [e.text for events in steps for e in events if isinstance(e, Chunk)]
    (final,) = [e for events in steps for e in events if isinstance(e, Finished) and e.key == 1]
    assert all(e.key == 1 for events in steps for e in events if isinstance(e, Chunk))
    assert "".join(chunks) == final.text
    assert len(chunks) >= 10  # about one per token; the first right after the prefill
    assert any(isinstance(e, Chunk) for e in steps[0])


def test_stream_never_sends_text_past_a_stop_string(engine: TransformersEngine) -> None:
    engine.add(job(1, prompt="1, 2, 3, 4,", max_new_tokens=30, stop=[" 7,"], stream=True))
    events: list[Event] = []
    while engine.pending:
        events.extend(engine.step())
    chunks = "".join(e.text for e in events if isinstance(e, Chunk))
    (final,) = [e for e in events if isinstance(e, Finished)]
    assert final.text == " 5, 6," and chunks == final.text


def test_cancel_stops_a_running_job(engine: TransformersEngine) -> None:
    engine.add(job(1, prompt="Once upon a time", max_new_tokens=50))
    engine.add(job(2, prompt="Hello", max_new_tokens=50))
    engine.step()
    engine.step()
    engine.cancel(1)
    assert engine.pending == 1
    events: list[Event] = []
    while engine.pending:
        events.extend(engine.step())
    assert {e.key for e in events} == {2}


def test_a_job_finishes_the_step_it_ends_not_with_its_batch(engine: TransformersEngine) -> None:
    engine.add(job(1, prompt="Hello", max_new_tokens=3))
    engine.add(job(2, prompt="Hello", max_new_tokens=12))
    finished_at = {}
    step = 0
    while engine.pending:
        step += 1
        for e in engine.step():
            finished_at[e.key] = step
    assert finished_at == {1: 3, 2: 12}


def test_prefill_groups_sort_by_length_within_the_token_budget() -> None:
    assert prefill_groups([50, 10, 48, 12], budget=100) == [[1, 3], [2, 0]]
    assert prefill_groups([300], budget=100) == [[0]]  # a long prompt is a group alone
    assert sorted(i for g in prefill_groups(list(range(1, 40)), 64) for i in g) == list(range(39))


def test_stream_ready_holds_back_a_possible_stop_and_partial_characters() -> None:
    assert stream_ready("Hello wor", "", 0) == "Hello wor"
    assert stream_ready("Hello wor", "Hello", 3) == " "
    assert stream_ready("caf\ufffd", "", 0) == "caf"
    assert stream_ready("other", "Hello", 0) == ""  # not a prefix: the final text settles it


def test_greedy_and_sampled_jobs_do_not_share_a_batch(engine: TransformersEngine) -> None:
    engine.add(job(1, prompt="Hello", max_new_tokens=2))
    engine.add(job(2, prompt="Hello", max_new_tokens=2, temperature=0.8))
    engine.add(job(3, prompt="Hi", max_new_tokens=2))
    finished_at = {}
    step = 0
    while engine.pending:
        step += 1
        finished_at.update({e.key: step for e in engine.step()})
    assert finished_at == {1: 2, 3: 2, 2: 4}  # two steps for the greedy pair, then the other


def test_seeded_sampling_is_reproducible(engine: TransformersEngine) -> None:
    params: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 0.95, "seed": 1234}
    first = run(engine, job(1, prompt="Once upon a time", max_new_tokens=8, **params))
    again = run(
        engine,
        job(2, prompt="Something else", max_new_tokens=8, temperature=1.0),
        job(3, prompt="Once upon a time", max_new_tokens=8, **params),
    )
    assert first[1].text == again[3].text


def test_unknown_engine_option_refused() -> None:
    with pytest.raises(EngineOptionError, match=r"unknown engine option.*bogus"):
        TransformersEngine(None, {"bogus": "1"})
    with pytest.raises(EngineOptionError, match="dtype='float8'"):
        TransformersEngine(None, {"dtype": "float8"})
    with pytest.raises(EngineOptionError, match="mode='continuous'"):
        TransformersEngine(None, {"mode": "continuous"})


def test_missing_model_is_unavailable_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable) as caught:
        TransformersEngine(str(tmp_path / "absent"), {}).load()
    assert "not found" in str(caught.value) and "\n" not in str(caught.value)


def test_broken_model_is_unavailable_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(EngineUnavailable) as caught:
        TransformersEngine(str(tmp_path / "broken.gguf"), {}).load()
    message = str(caught.value)
    assert message.startswith("transformers: cannot load model") and "\n" not in message


def test_kv_bytes_per_token_of_the_demo_model(engine: TransformersEngine) -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32 -> keys and values of 30*3*64*4 B.
    assert kv_bytes_per_token(engine._loaded().model.config, 4) == 2 * 30 * 3 * 64 * 4
    assert (
        engine._loaded().kv_bytes_per_token
        == 2 * 30 * 3 * 64 * engine._loaded().model.dtype.itemsize
    )
    # A config that does not say is not guessed at.
    assert kv_bytes_per_token(SimpleNamespace(hidden_size=576), 4) is None


def test_kv_budget_is_a_share_of_available_memory() -> None:
    assert kv_token_budget(1000, 10_000_000) == 2_000  # 20 % of 10 MB at 1 kB a token
    assert kv_token_budget(None, 10_000_000) is None
    assert kv_token_budget(1000, None) is None
    assert kv_token_budget(10**9, 10) == 1  # one job always runs


def test_a_cpu_batch_stays_within_the_kv_budget(engine: TransformersEngine) -> None:
    jobs = [job(700 + i, f"Count to {i}, slowly.", max_new_tokens=10) for i in range(6)]
    for j in jobs:
        engine.add(j)
    width = max(len(w.input_ids) for w in engine._waiting)
    saved = engine._kv_token_budget
    engine._kv_token_budget = 2 * (width + 10)  # room for two rows
    try:
        sizes = []
        while engine.pending:
            sizes.append(len(engine._take_batch()))
    finally:
        engine._kv_token_budget = saved
    assert sizes == [2, 2, 2]


def test_vllm_extensions_in_one_batch(engine: TransformersEngine) -> None:
    """ignore_eos and min_tokens are per row: jobs with and without them share a batch."""
    done = run(
        engine,
        job(1, messages=CAPITAL, max_new_tokens=40),
        job(2, messages=CAPITAL, max_new_tokens=40, min_tokens=30),
        job(3, messages=CAPITAL, max_new_tokens=40, ignore_eos=True),
    )
    plain, held, ignored = done[1], done[2], done[3]
    assert plain.finish_reason == P.FINISH_STOP and plain.completion_tokens < 30
    assert held.completion_tokens >= 30
    assert (ignored.finish_reason, ignored.completion_tokens) == (P.FINISH_LENGTH, 40)


def test_a_prompt_read_alone_and_as_token_ids(engine: TransformersEngine) -> None:
    tokenizer = engine._loaded().tokenizer
    text = "Rivers run to the sea"
    ids = tokenizer(text)["input_ids"]
    read = run(engine, job(1, text, max_new_tokens=0, echo=True, prompt_logprobs=2))[1]
    assert (read.text, read.completion_tokens, read.prompt_tokens) == ("", 0, len(ids))
    assert read.prompt is not None and read.prompt.ids == ids and read.prompt.text == text
    entries = read.prompt.logprobs
    assert entries is not None and len(entries) == len(ids) and entries[0][2] is None
    assert all(e[2] <= 0 and e[3] >= 1 and len(e[4]) == 2 for e in entries[1:])
    by_text = run(engine, job(2, text, max_new_tokens=5))[2]
    by_ids = run(engine, job(3, ids, max_new_tokens=5))[3]
    assert by_ids.text == by_text.text and by_ids.prompt_tokens == len(ids)
    with pytest.raises(JobRejected) as caught:
        engine.add(job(4, [10**7], max_new_tokens=1))
    assert caught.value.field == "prompt"
