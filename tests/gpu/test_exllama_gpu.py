"""The exllama engines on a real GPU with a real model.

Needs: CUDA, the engine's library importable (exllamav2 for EXL2, exllamav3 for EXL3;
an unquantised HF directory runs on both), and a model directory in EXGEN_GPU_MODEL.
Elsewhere every test here is skipped with the reason. Run:

    EXGEN_GPU_MODEL=models/Llama-3.1-8B-Instruct-exl2-4.0bpw \\
        .venv/bin/python -m pytest tests/gpu -m gpu -v

EXGEN_GPU_OPTS adds engine options (``cache_tokens=16384,cache=q8``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exgen.client import protocol as P
from exgen.daemon.engines.base import Chunk, Event, Finished, Job, JobRejected, SamplingParams
from exgen.daemon.engines.exl_common import ExlEngine
from exgen.daemon.modelprobe import FORMAT_EXL2, FORMAT_EXL3, inspect_model

pytestmark = pytest.mark.gpu

ENGINES = {"exllamav2": "exl2:ExLlamaV2Engine", "exllamav3": "exl3:ExLlamaV3Engine"}
PROMPT = "The capital of France is"
RANDOM_MODEL_MARKER = "gpu_model.json"  # bench/gpu_model.py's MARKER


def _model_dir() -> Path:
    raw = os.environ.get("EXGEN_GPU_MODEL")
    if not raw:
        pytest.skip("EXGEN_GPU_MODEL is not set (a model directory for the GPU tests)")
    path = Path(raw).expanduser()
    if not path.is_dir():
        pytest.skip(f"EXGEN_GPU_MODEL={raw} is not a directory")
    return path


def _random_weights() -> bool:
    """The model bench/gpu_model.py makes (random weights) leaves its marker file."""
    return (_model_dir() / RANDOM_MODEL_MARKER).is_file()


def _require_cuda() -> None:
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")


def _engines_for(model: Path) -> list[str]:
    fmt = inspect_model(model).format
    if fmt == FORMAT_EXL2:
        return ["exllamav2"]
    if fmt == FORMAT_EXL3:
        return ["exllamav3"]
    return ["exllamav2", "exllamav3"]


def _options() -> dict[str, str]:
    opts = {"cache_tokens": "16384", "max_batch_size": "16"}
    for pair in filter(None, os.environ.get("EXGEN_GPU_OPTS", "").split(",")):
        key, _, value = pair.partition("=")
        opts[key.strip()] = value.strip()
    return opts


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> Iterator[ExlEngine]:
    model = _model_dir()
    _require_cuda()
    name: str = request.param
    if name not in _engines_for(model):
        pytest.skip(f"{model} is not a model {name} serves")
    try:
        importlib.import_module(name)  # compiles the extension on first use: minutes
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"{name} cannot be imported here: {exc}")
    module, _, cls_name = ENGINES[name].partition(":")
    cls = getattr(importlib.import_module(f"exgen.daemon.engines.{module}"), cls_name)
    eng: ExlEngine = cls(str(model), _options())
    eng.load()
    yield eng
    eng.close()


def make_job(key: int, prompt: str = PROMPT, stream: bool = False, **params: Any) -> Job:
    params.setdefault("max_new_tokens", 32)
    return Job(key, prompt, None, SamplingParams.from_wire(params), stream)


def drain(engine: ExlEngine, limit_steps: int = 20_000) -> list[Event]:
    events: list[Event] = []
    for _ in range(limit_steps):
        if not engine.pending:
            return events
        events.extend(engine.step())
    raise AssertionError("jobs did not finish")


def finished(events: list[Event]) -> dict[int, Finished]:
    out: dict[int, Finished] = {}
    for e in events:
        if isinstance(e, Finished):
            assert e.key not in out, f"job {e.key} finished twice"
            out[e.key] = e
    return out


def test_loads_and_describes_itself(engine: ExlEngine) -> None:
    info = engine.describe()
    assert info["library"] in ENGINES and info["cache_tokens"] % 256 == 0
    assert engine.capacity >= 1 and (engine.max_seq_len or 0) > 0
    if info["paged"]:
        assert engine.capacity > 1


def test_greedy_generation_is_deterministic_and_counted(engine: ExlEngine) -> None:
    engine.add(make_job(1))
    engine.add(make_job(2))
    done = finished(drain(engine))
    assert done[1].text and done[1].text == done[2].text
    assert done[1].finish_reason in (P.FINISH_STOP, P.FINISH_LENGTH)
    assert 0 < done[1].completion_tokens <= 32 and done[1].prompt_tokens > 0
    if done[1].finish_reason == P.FINISH_LENGTH:
        assert done[1].completion_tokens == 32


def test_streamed_chunks_add_up_to_the_result(engine: ExlEngine) -> None:
    engine.add(make_job(3, stream=True))
    events = drain(engine)
    text = "".join(e.text for e in events if isinstance(e, Chunk))
    assert text == finished(events)[3].text


def test_a_stop_string_ends_the_text_before_it(engine: ExlEngine) -> None:
    engine.add(make_job(4, max_new_tokens=48))
    full = finished(drain(engine))[4].text
    words = full.split()
    if len(words) < 4:
        pytest.skip(f"output too short to pick a stop string from: {full!r}")
    stop = words[2]
    engine.add(make_job(5, max_new_tokens=48, stop=[stop]))
    result = finished(drain(engine))[5]
    assert result.finish_reason == P.FINISH_STOP
    assert stop not in result.text and full.startswith(result.text)


def test_a_batch_finishes_each_job_once(engine: ExlEngine) -> None:
    prompts = [f"Write a sentence about the number {i}." for i in range(24)]
    for key, prompt in enumerate(prompts, start=100):
        engine.add(make_job(key, prompt, temperature=0.8, top_p=0.9, seed=key))
    done = finished(drain(engine))
    assert sorted(done) == list(range(100, 124))


def test_cancel_mid_generation_emits_nothing_more(engine: ExlEngine) -> None:
    engine.add(make_job(200, "Count from one to five hundred:", stream=True, max_new_tokens=400))
    engine.add(make_job(201))
    early: list[Event] = []
    for _ in range(20):
        early.extend(engine.step())
    assert 200 not in finished(early)  # 400 tokens take more than 20 steps
    engine.cancel(200)
    later = drain(engine)
    assert all(e.key != 200 for e in later)
    assert 201 in finished(early + later)


def test_a_prompt_beyond_max_seq_len_is_rejected(engine: ExlEngine) -> None:
    limit = engine.max_seq_len or 0
    with pytest.raises(JobRejected) as exc:
        engine.add(make_job(300, "hello " * limit))
    assert exc.value.code == P.E_PROMPT_TOO_LONG
    assert engine.pending == 0


def test_chat_messages_use_the_model_template(engine: ExlEngine) -> None:
    job = Job(
        400,
        None,
        [{"role": "user", "content": "Say hello."}],
        SamplingParams.from_wire({"max_new_tokens": 24}),
        False,
    )
    try:
        engine.add(job)
    except JobRejected as exc:
        pytest.skip(f"model has no chat template: {exc.message}")
    result = finished(drain(engine))[400]
    assert result.text.strip()


# --- structured output, logprobs, n, penalties ---------------------------------------------

BOUNDED_SCHEMA = {  # every value bounded: even a model of random weights must finish it
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "label": {"enum": ["positive", "negative", "neutral"]},
    },
    "required": ["name", "age", "ok", "label"],
    "additionalProperties": False,
}


def test_json_schema_outputs_validate_whatever_the_weights(engine: ExlEngine) -> None:
    import json

    params = P.validate_params({"json_schema": BOUNDED_SCHEMA, "max_new_tokens": 120})
    for key in range(500, 508):
        engine.add(make_job(key, f"Person {key} as JSON:", **params))
    done = finished(drain(engine))
    assert sorted(done) == list(range(500, 508))
    for result in done.values():
        assert result.finish_reason == P.FINISH_STOP, result.text
        person = json.loads(result.text)  # the schema checked by hand (no jsonschema there)
        assert list(person) == ["name", "age", "ok", "label"]
        assert isinstance(person["name"], str) and len(person["name"]) <= 8
        assert type(person["age"]) is int and 0 <= person["age"] <= 99
        assert type(person["ok"]) is bool and person["label"] in ("positive", "negative", "neutral")
    with pytest.raises(JobRejected) as exc:
        engine.add(make_job(508, **P.validate_params({"json_schema": {"$ref": "#/nope"}})))
    assert exc.value.field == "params.json_schema"


def test_logprobs_are_per_token_and_greedy_picks_the_best(engine: ExlEngine) -> None:
    import math

    engine.add(make_job(600, logprobs=True, top_logprobs=4, max_new_tokens=16))
    result = finished(drain(engine))[600]
    entries = result.logprobs
    assert entries, "no logprobs"
    if not _random_weights():
        # A real model's tokens for this prompt are whole characters; a random one
        # emits any byte-level token, most of them part of a UTF-8 character, and a
        # token's text alone is then U+FFFD (docs/protocol.md): no bug, no check.
        assert "".join(e[0] for e in entries) == result.text
    for _token, logprob, top in entries:
        assert logprob <= 0 and len(top) == 4
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert abs(logprob - values[0]) < 1e-3  # greedy: the chosen one is the likeliest
        assert sum(math.exp(v) for v in values) <= 1 + 1e-3


def test_n_samples_come_back_as_choices(engine: ExlEngine) -> None:
    engine.add(make_job(700, n=3, temperature=1.0, seed=1, max_new_tokens=12))
    engine.add(make_job(701, n=2, max_new_tokens=12))
    engine.add(make_job(702, max_new_tokens=12, presence_penalty=1.5, frequency_penalty=0.5))
    done = finished(drain(engine))
    sampled, greedy = done[700], done[701]
    assert sampled.choices is not None and len(sampled.choices) == 3
    assert sampled.completion_tokens == sum(c.completion_tokens for c in sampled.choices)
    assert greedy.choices is not None and greedy.choices[0].text == greedy.choices[1].text
    assert done[702].text


def test_the_random_model_marker_is_the_one_gpu_model_writes() -> None:
    """Runs everywhere (no GPU needed): the name above must follow bench/gpu_model.py."""
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import gpu_model
    finally:
        sys.path.remove(str(bench))
    assert gpu_model.MARKER == RANDOM_MODEL_MARKER
