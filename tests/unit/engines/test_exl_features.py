"""The exllama engines' side of structured output, logprobs and n, driven through the
scripted library double of test_exl_driving (TEST DOUBLE: it generates nothing; that
its result dicts and the filter hooks are the libraries' is test_exl_conformance's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exgen.daemon.engines.base import Chunk, Failed, Finished, JobRejected
from tests.unit.engines.test_exl_driving import job, make_engine, run_until_done, write_model_dir
from tests.unit.engines.test_grammar import SCHEMA, tiny_tokenizer_json


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = write_model_dir(tmp_path / "model")
    (path / "tokenizer.json").write_text(tiny_tokenizer_json())  # a real one: llguidance reads it
    return path


def script(pieces: list[str], reason: str = "stop_token", lps: bool = False) -> list[Any]:
    steps: list[Any] = [[{"stage": "started", "eos": False}]]
    for i, piece in enumerate(pieces):
        result: dict[str, Any] = {"stage": "streaming", "eos": False, "text": piece}
        if lps:
            result["lp"] = [[piece, -0.1 * (i + 1), [[piece, -0.1 * (i + 1)], ["z", -4.0]]]]
        if i == len(pieces) - 1:
            result.update(eos=True, eos_reason=reason, new_tokens=len(pieces) + 1)
            if lps:  # the stop token's own entry: no text
                result["held"] = {"text": "", "lp": [["", -0.01, [["", -0.01]]]]}
        steps.append([result])
    return steps


def test_n_samples_are_n_library_jobs_on_one_prompt(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    engine.add(job(1, "one two", stream=True, n=3, seed=10, temperature=0.8, max_new_tokens=8))
    specs = gen.submitted
    assert [s.identifier for s in specs] == [(1, 0), (1, 1), (1, 2)]
    assert {tuple(s.input_ids) for s in specs} == {tuple(specs[0].input_ids)}
    assert [s.params.seed for s in specs] == [10, 11, 12] and all(s.params.n == 1 for s in specs)
    events = run_until_done(engine)
    [done] = [e for e in events if isinstance(e, Finished)]
    assert done.choices is not None and len(done.choices) == 3
    assert done.completion_tokens == 3 and done.text == "ok"
    assert [e.key for e in events if isinstance(e, Chunk)] == [1]  # the first sample streams
    assert not engine.pending


def test_cancel_and_a_failed_sample_end_every_sample(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    engine.add(job(1, "a b", n=2))
    engine.cancel(1)
    assert len(gen.cancelled) == 2 and not engine.pending
    gen.scripts[2] = [[{"stage": "started", "eos": False}], [{"stage": "error", "error": "boom"}]]
    engine.add(job(2, "a b", n=2))
    events = run_until_done(engine)
    assert [type(e) for e in events] == [Failed] and not engine.pending
    assert len(gen.cancelled) == 3  # the other sample of job 2


def test_logprobs_cover_the_text_and_leave_out_the_stop_token(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = script(["{", '"a"', "}"], lps=True)
    engine.add(job(1, "x", logprobs=True, top_logprobs=2))
    engine.add(job(2, "x"))
    done = {e.key: e for e in run_until_done(engine) if isinstance(e, Finished)}
    assert [s.top_logprobs for s in gen.submitted] == [2, None]
    lps = done[1].logprobs
    assert lps is not None and "".join(t for t, _, _ in lps) == done[1].text == '{"a"}'
    assert lps[0] == ["{", pytest.approx(-0.1), [["{", pytest.approx(-0.1)], ["z", -4.0]]]
    assert done[2].logprobs is None


def test_stop_string_cut_logprobs_to_the_text(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = script(["ab", "c"], reason="stop_string", lps=True)
    gen.scripts[1][-1][0]["text"] = ""  # the library holds back the stop string's piece
    engine.add(job(1, "x", logprobs=True, stop=["c"]))
    [done] = [e for e in run_until_done(engine) if isinstance(e, Finished)]
    assert done.text == "ab" and [t for t, _, _ in done.logprobs or []] == ["ab"]


def test_a_json_schema_job_gets_a_matcher_and_a_bad_schema_fails_alone(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    engine.add(job(1, "x", json_schema=json.dumps(SCHEMA)))
    [spec] = gen.submitted
    assert spec.grammar is not None
    matcher = spec.grammar()
    assert matcher.vocab_size == gen.vocab_size and not matcher.stopped
    with pytest.raises(JobRejected) as info:
        engine.add(job(2, "x", json_schema=json.dumps({"$ref": "#/missing"})))
    assert info.value.field == "params.json_schema" and "missing" in info.value.message
    assert len(gen.submitted) == 1  # nothing reached the library
    engine.add(job(3, "x"))
    assert gen.submitted[-1].grammar is None
    assert {e.key for e in run_until_done(engine) if isinstance(e, Finished)} == {1, 3}
