"""The transformers engine's structured output, logprobs, n and penalties, in-process on
the real demo model (SmolLM2-135M, CPU, fp32 so that logits compare exactly)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from exgen.client import protocol as P
from exgen.daemon.engines.base import Event, Finished, Job, JobRejected, SamplingParams
from exgen.daemon.engines.hf import TransformersEngine
from exgen.daemon.engines.hf_features import BatchFeatures, RowExtras
from tests.unit.engines.hf_support import loaded_engine

torch = pytest.importorskip("torch")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine() -> Iterator[TransformersEngine]:
    with loaded_engine(threads="2", batch_size="16", dtype="float32") as eng:
        yield eng


def job(key: int, prompt: Any, **params: Any) -> Job:
    checked = SamplingParams.from_wire(P.validate_params(params))
    if isinstance(prompt, str):
        return Job(key, prompt, None, checked)
    return Job(key, None, prompt, checked)


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Invent person {i}: name, age, mood and pets, as JSON."}]


def run(engine: TransformersEngine, *jobs: Job) -> list[Event]:
    for j in jobs:
        engine.add(j)
    events: list[Event] = []
    while engine.pending:
        events.extend(engine.step())
    return events


def finished(events: list[Event]) -> dict[int, Finished]:
    return {e.key: e for e in events if isinstance(e, Finished)}


def test_every_output_under_a_schema_parses_and_validates(engine: TransformersEngine) -> None:
    jobs = [job(i, chat(i), json_schema=SCHEMA, max_new_tokens=100) for i in range(8)]
    jobs.append(job(99, chat(99), response_format="json_object", max_new_tokens=120))
    jobs.append(job(100, "The capital of France is", max_new_tokens=8))  # same batch, free
    done = finished(run(engine, *jobs))
    assert len(done) == 10
    for key in range(8):
        assert done[key].finish_reason == P.FINISH_STOP, done[key].text
        jsonschema.validate(json.loads(done[key].text), SCHEMA)
    assert isinstance(json.loads(done[99].text), dict)
    free = finished(run(engine, job(101, "The capital of France is", max_new_tokens=8)))
    assert done[100].text == free[101].text  # a masked neighbour changes nothing


def test_a_schema_that_cannot_be_compiled_fails_at_add(engine: TransformersEngine) -> None:
    with pytest.raises(JobRejected) as info:
        engine.add(job(1, "x", json_schema={"type": "string", "pattern": "(unclosed"}))
    assert info.value.code == P.E_BAD_REQUEST and info.value.field == "params.json_schema"
    assert "regex" in info.value.message
    assert not engine.pending


def _teacher_forced_logprobs(engine: TransformersEngine, prompt: str, new: list[int]) -> Any:
    """log-softmax of transformers' own logits for prompt + the generated tokens, in
    one forward pass (no cache, no engine code)."""
    state = engine._loaded()
    ids = state.tokenizer(prompt)["input_ids"] + new
    with torch.inference_mode():
        logits = state.model(input_ids=torch.tensor([ids])).logits[0].float()
    start = len(ids) - len(new) - 1
    return torch.log_softmax(logits[start : start + len(new)], dim=-1)


def test_greedy_logprobs_equal_log_softmax_of_transformers_logits(
    engine: TransformersEngine,
) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    jobs = [
        job(i, p, max_new_tokens=12, logprobs=True, top_logprobs=5) for i, p in enumerate(prompts)
    ]
    done = finished(run(engine, *jobs))
    for i, prompt in enumerate(prompts):
        result = done[i]
        entries = result.logprobs
        assert entries is not None
        # one entry per token of the text (an EOS that ended the job has none)
        assert "".join(e[0] for e in entries) == result.text
        assert len(entries) == result.completion_tokens - (result.finish_reason == P.FINISH_STOP)
        generated = _generated_ids(engine, prompt, result)
        assert len(generated) == len(entries)
        reference = _teacher_forced_logprobs(engine, prompt, generated)
        for step, (token_text, logprob, top) in enumerate(entries):
            row = reference[step]
            assert abs(logprob - row[generated[step]].item()) < 1e-4
            assert abs(logprob - row.max().item()) < 1e-4  # greedy: the chosen is the best
            values, indices = row.topk(5)
            assert [t for t, _ in top] == [engine._piece(int(t)) for t in indices]
            for (_, value), want in zip(top, values.tolist(), strict=True):
                assert abs(value - want) < 1e-4
            assert top[0] == [token_text, logprob]
            assert sum(math.exp(v) for _, v in top) <= 1 + 1e-6


def _generated_ids(engine: TransformersEngine, prompt: str, result: Finished) -> list[int]:
    """The tokens the engine generated, recovered by greedy decoding with the model."""
    state = engine._loaded()
    enc = state.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = state.model.generate(
            **enc,
            max_new_tokens=result.completion_tokens,
            do_sample=False,
            pad_token_id=state.pad_id,
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert state.tokenizer.decode(new, skip_special_tokens=True) == result.text
    return [t for t in new if t not in state.eos_ids]


def test_n_samples_share_one_prefill_and_come_back_as_choices(engine: TransformersEngine) -> None:
    model = engine._loaded().model
    shapes: list[tuple[int, int]] = []

    def record(_module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            shapes.append(tuple(ids.shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        done = finished(
            run(engine, job(1, "Once upon a time", n=4, temperature=1.0, seed=3, max_new_tokens=10))
        )
    finally:
        hook.remove()
    assert shapes == [(1, 4)]  # the prompt (4 tokens) was prefilled once, for 4 samples
    result = done[1]
    assert result.choices is not None and len(result.choices) == 4
    assert result.text == result.choices[0].text
    assert len({c.text for c in result.choices}) > 1
    assert result.completion_tokens == sum(c.completion_tokens for c in result.choices)
    again = finished(
        run(engine, job(2, "Once upon a time", n=4, temperature=1.0, seed=3, max_new_tokens=10))
    )
    assert [c.text for c in again[2].choices or []] == [c.text for c in result.choices]
    greedy = finished(run(engine, job(3, "Once upon a time", n=2, max_new_tokens=8)))
    single = finished(run(engine, job(4, "Once upon a time", max_new_tokens=8)))
    assert [c.text for c in greedy[3].choices or []] == [single[4].text] * 2


def test_cancel_stops_every_sample(engine: TransformersEngine) -> None:
    engine.add(job(1, "Once upon a time", n=3, temperature=1.0, max_new_tokens=40))
    engine.step()
    engine.cancel(1)
    assert not engine.pending
    assert engine.step() == []


def test_presence_and_frequency_penalties_change_the_text(engine: TransformersEngine) -> None:
    plain = finished(run(engine, job(1, "The list: apple, apple, apple,", max_new_tokens=16)))
    penalised = finished(
        run(
            engine,
            job(2, "The list: apple, apple, apple,", max_new_tokens=16, frequency_penalty=2.0),
        )
    )
    assert plain[1].text != penalised[2].text
    assert penalised[2].text.count("apple") < plain[1].text.count("apple")


def test_the_penalties_count_each_rows_generated_tokens() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    features = BatchFeatures(torch, params, str)
    scores = torch.zeros((2, 6))
    generated = torch.tensor([[1, 1, 3], [2, 5, 5]])
    out = features.constrain([RowExtras(), RowExtras()], scores, generated)
    assert out[0].tolist() == [0, -1.0, 0, -0.75, 0, 0]
    assert out[1].tolist() == [0, 0, -0.75, 0, 0, -1.0]


def test_a_failed_matcher_fails_its_job_alone() -> None:
    class Broken:
        vocab_size = 8

        def fill_mask(self, words: Any) -> None:
            words.fill_(-1)

        def consume(self, token: int) -> None:
            pass

        @property
        def error(self) -> str:
            return "parser limit"

    extras = [RowExtras(matcher=Broken()), RowExtras()]  # type: ignore[arg-type]
    features = BatchFeatures(torch, SamplingParams(), str)
    features.constrain(extras, torch.zeros((2, 8)), torch.zeros((2, 0), dtype=torch.long))
    features.chosen(extras, [1, 2], [False, False])
    assert extras[0].failure == "parser limit" and extras[1].failure is None
