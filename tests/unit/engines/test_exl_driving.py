"""The exllama engines' driving logic, without the libraries.

TEST DOUBLE: :class:`ScriptedGenerator` stands in for the library adapter (model,
tokenizer and dynamic generator). It emits the result dicts that ExLlamaV2's and
ExLlamaV3's ``iterate()`` document (``stage`` started/prefill/streaming, ``eos``,
``eos_reason``, ``text``, ``held``, ``new_tokens``, ``prompt_tokens``, ``identifier``,
and V3's ``stage: "error"``), following a script per job. It generates nothing; what
it checks is our side: request → job, result dicts → events. That the dicts and names
are the libraries' real ones is test_exl_conformance.py's job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from exgen.client import protocol as P
from exgen.daemon.engines import exl2, exl3
from exgen.daemon.engines.base import (
    Chunk,
    EngineOptionError,
    EngineUnavailable,
    Failed,
    Finished,
    Job,
    JobRejected,
    SamplingParams,
)
from exgen.daemon.engines.exl_common import (
    ExlEngine,
    JobSpec,
    PromptBuilder,
    parse_options,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BOS = 1


def write_model_dir(
    path: Path, *, template: str | None = CHAT_TEMPLATE, add_bos: Any = None
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"eos_token_id": 2, "architectures": ["X"]}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 32007]}))
    tok_cfg: dict[str, Any] = {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    if template is not None:
        tok_cfg["chat_template"] = template
    if add_bos is not None:
        tok_cfg["add_bos_token"] = add_bos
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (path / "tokenizer.json").write_text(json.dumps({"post_processor": None}))
    return path


# --- the test double ----------------------------------------------------------------------


def token_script(
    pieces: list[str], eos_reason: str = "max_new_tokens"
) -> list[list[dict[str, Any]]]:
    """What a generator emits for one job, step by step: started, prefill, then one
    streaming dict per token; the last carries eos and the job's totals."""
    steps: list[list[dict[str, Any]]] = [[{"stage": "started", "eos": False}]]
    steps.append([{"stage": "prefill", "eos": False, "curr_progress": 1, "max_progress": 1}])
    for i, piece in enumerate(pieces):
        # token_ids as the libraries give them: a tensor of shape (1, n); here one a step
        result: dict[str, Any] = {
            "stage": "streaming",
            "eos": False,
            "text": piece,
            "token_ids": SimpleNamespace(shape=(1, 1)),
        }
        if i == len(pieces) - 1:
            result.update(
                eos=True,
                eos_reason=eos_reason,
                new_tokens=len(pieces),
                full_completion="".join(pieces),
            )
        steps.append([result])
    return steps


@dataclass
class LibJob:
    """Stands in for ExLlamaV2DynamicJob / exllamav3.Job."""

    spec: JobSpec
    steps: list[list[dict[str, Any]]]
    identifier: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.identifier = self.spec.identifier


class ScriptedGenerator:
    """TEST DOUBLE for the LibraryAdapter: scripted iterate() results, no model."""

    def __init__(
        self,
        *,
        paged: bool = True,
        max_batch_size: int = 8,
        max_seq_len: int = 4096,
        eos_token_id: int | None = 2,
    ) -> None:
        self.paged = paged
        self.vocab_size = 320
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.eos_token_id = eos_token_id
        self.scripts: dict[int, list[list[dict[str, Any]]]] = {}
        self.submitted: list[JobSpec] = []
        self.active: list[LibJob] = []
        self.cancelled: list[LibJob] = []
        self.iterations = 0
        self.refuse_next = False

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [100 + len(word) for word in text.split()]  # one token a word
        return [BOS, *ids] if add_bos else ids

    def submit(self, spec: JobSpec) -> LibJob:
        if self.refuse_next:
            raise AssertionError("Job requires 9 pages (only 8 available)")
        self.submitted.append(spec)
        job = LibJob(
            spec, [list(step) for step in self.scripts.get(spec.key, token_script(["ok"]))]
        )
        self.active.append(job)
        return job

    def cancel(self, handle: LibJob) -> None:
        self.cancelled.append(handle)
        if handle in self.active:  # both libraries ignore a job they no longer hold
            self.active.remove(handle)

    def iterate(self) -> list[dict[str, Any]]:
        self.iterations += 1
        results = []
        for job in list(self.active):
            for result in job.steps.pop(0) if job.steps else []:
                full = {"job": job, "serial": job.spec.key, **result}
                if full.get("stage") != "error":  # V3 error results carry only the job
                    full["identifier"] = job.identifier
                if full.get("eos"):
                    full.setdefault("prompt_tokens", len(job.spec.input_ids))
                results.append(full)
            if not job.steps:
                self.active.remove(job)
        return results

    def token_logprobs(self, result: dict[str, Any], top: int) -> list[Any]:
        """A scripted result's ``lp``: [token, logprob, alternatives] per token."""
        return [[t, lp, alts[:top]] for t, lp, alts in result.get("lp", [])]

    def describe(self) -> dict[str, Any]:
        return {"scripted": True}

    def close(self) -> None:
        self.active.clear()


class ScriptedEngine(ExlEngine):
    name = "scripted"

    def _open_library(self, model_dir: Path, opts: Any) -> Any:
        raise AssertionError("tests attach a ScriptedGenerator instead")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model")


def make_engine(model_dir: Path, **kwargs: Any) -> tuple[ScriptedEngine, ScriptedGenerator]:
    gen = ScriptedGenerator(**kwargs)
    engine = ScriptedEngine(str(model_dir), {})
    engine.attach(gen, PromptBuilder.from_model_dir(model_dir), model_dir)
    return engine, gen


def job(
    key: int,
    prompt: str | None = "hello there world",
    *,
    stream: bool = False,
    messages: list[dict[str, str]] | None = None,
    **params: Any,
) -> Job:
    return Job(
        key=key,
        prompt=None if messages else prompt,
        messages=messages,
        params=SamplingParams.from_wire(params),
        stream=stream,
    )


def run_until_done(engine: ExlEngine, limit: int = 50) -> list[Any]:
    events: list[Any] = []
    for _ in range(limit):
        if not engine.pending:
            break
        events.extend(engine.step())
    return events


# --- request -> job -------------------------------------------------------------------------


def test_job_carries_prompt_tokens_budget_and_every_stop_condition(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    engine.add(job(1, "one two three", max_new_tokens=20, stop=["###", "\n\n"], seed=7))
    (spec,) = gen.submitted
    assert spec.key == 1
    assert spec.input_ids == [103, 103, 105]  # no BOS: the tokenizer would not add one
    assert spec.max_new_tokens == 20
    assert spec.params.seed == 7
    # Every EOS: generation_config's list, config.json's and the tokenizer's, once each.
    assert spec.stop_conditions == [2, 32007, "###", "\n\n"]


def test_sampling_fields_reach_the_job_unchanged(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    params: dict[str, Any] = {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    engine.add(job(1, "a prompt", **params))
    got = gen.submitted[0].params
    assert {name: getattr(got, name) for name in params} == params


def test_exllamav2_settings_are_the_request_and_neutral_elsewhere() -> None:
    sampled = exl2.sampler_settings(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1)
    )
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["min_p"]) == (
        0.7,
        0.9,
        40,
        0.05,
    )
    assert sampled["token_repetition_penalty"] == 1.1
    assert sampled["token_repetition_range"] == -1
    assert sampled["dry_multiplier"] == 0.0 and sampled["xtc_probability"] == 0.0
    assert sampled["mirostat"] is False and sampled["token_bias"] is None
    greedy = exl2.sampler_settings(SamplingParams())
    # Greedy as the library spells it (Settings.greedy): top_k 1 at temperature 1.
    assert (greedy["top_k"], greedy["temperature"], greedy["token_repetition_penalty"]) == (
        1,
        1.0,
        1.0,
    )


def test_exllamav3_sampler_is_the_request_and_neutral_elsewhere() -> None:
    sampled = exl3.sampler_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1)
    )
    assert (
        sampled["temperature"],
        sampled["top_p"],
        sampled["top_k"],
        sampled["min_p"],
        sampled["rep_p"],
    ) == (0.7, 0.9, 40, 0.05, 1.1)
    assert (
        sampled["freq_p"] == 0.0 and sampled["pres_p"] == 0.0 and sampled["dry_multiplier"] == 0.0
    )
    assert sampled["adaptive_target"] == 1.0 and sampled["logit_bias"] is None
    assert exl3.sampler_kwargs(SamplingParams())["temperature"] == 0.0  # ComboSampler: argmax


def test_chat_messages_are_rendered_with_the_model_template(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    prompts = PromptBuilder.from_model_dir(model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi you"}]
    text, add_bos = prompts.text_for(job(1, messages=messages))
    assert text == "<s><|system|>be brief<|end|>\n<|user|>hi you<|end|>\n<|assistant|>"
    assert add_bos is False  # the template wrote BOS itself
    engine.add(job(1, messages=messages))
    assert gen.submitted[0].input_ids == gen.encode(text, False)


def test_template_errors_and_missing_templates_reject_the_job(tmp_path: Path) -> None:
    engine, gen = make_engine(write_model_dir(tmp_path / "m"))
    with pytest.raises(JobRejected) as exc:
        engine.add(job(1, messages=[{"role": "tool", "content": "x"}]))
    assert exc.value.code == P.E_BAD_REQUEST and "no tools here" in exc.value.message
    bare, _ = make_engine(write_model_dir(tmp_path / "bare", template=None))
    with pytest.raises(JobRejected, match="no chat template"):
        bare.add(job(2, messages=[{"role": "user", "content": "x"}]))
    assert not gen.submitted and not bare.pending


def test_plain_prompts_get_bos_where_the_hf_tokenizer_adds_it(tmp_path: Path) -> None:
    assert PromptBuilder.from_model_dir(
        write_model_dir(tmp_path / "a", add_bos=True)
    ).plain_adds_bos
    assert not PromptBuilder.from_model_dir(write_model_dir(tmp_path / "b")).plain_adds_bos
    llama3 = write_model_dir(tmp_path / "c")
    (llama3 / "tokenizer.json").write_text(
        json.dumps(
            {
                "post_processor": {
                    "type": "Sequence",
                    "processors": [
                        {"type": "ByteLevel"},
                        {
                            "type": "TemplateProcessing",
                            "single": [
                                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                {"Sequence": {"id": "A", "type_id": 0}},
                            ],
                        },
                    ],
                }
            }
        )
    )
    engine, gen = make_engine(llama3)
    engine.add(job(1, "a b"))
    assert gen.submitted[0].input_ids[0] == BOS


def test_prompt_plus_budget_over_max_seq_len_is_rejected_before_the_library(
    model_dir: Path,
) -> None:
    engine, gen = make_engine(model_dir, max_seq_len=10)
    engine.add(job(1, "a b c d e", max_new_tokens=5))  # 5 + 5 = 10: fits exactly
    with pytest.raises(JobRejected) as exc:
        engine.add(job(2, "a b c d e f", max_new_tokens=5))
    assert exc.value.code == P.E_PROMPT_TOO_LONG
    assert "6 tokens" in exc.value.message and "limit of 10" in exc.value.message
    assert [s.key for s in gen.submitted] == [1] and engine.pending == 1


def test_empty_prompt_is_a_bad_request(model_dir: Path) -> None:
    engine, _ = make_engine(model_dir)
    with pytest.raises(JobRejected) as exc:
        engine.add(job(1, "   "))
    assert exc.value.code == P.E_BAD_REQUEST


def test_a_library_assertion_on_enqueue_rejects_only_that_job(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.refuse_next = True
    with pytest.raises(JobRejected) as exc:
        engine.add(job(1))
    assert exc.value.code == P.E_ENGINE and "pages" in exc.value.message
    gen.refuse_next = False
    engine.add(job(2))
    assert engine.pending == 1


# --- result dicts -> events -------------------------------------------------------------------


def test_streaming_job_emits_chunks_then_finished_with_counts(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = token_script(["Hel", "lo", " wor"], eos_reason="max_new_tokens")
    engine.add(job(1, "a b", stream=True, max_new_tokens=3))
    events = run_until_done(engine)
    assert events == [  # each with the tokens so far and the prompt's (continuous usage)
        Chunk(1, "Hel", 1, 2),
        Chunk(1, "lo", 2, 2),
        Chunk(1, " wor", 3, 2),
        Finished(1, "Hello wor", P.FINISH_LENGTH, prompt_tokens=2, completion_tokens=3),
    ]
    assert engine.pending == 0


def test_non_streaming_job_emits_only_finished(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = token_script(["A", "B"], eos_reason="stop_token")
    engine.add(job(1, "x"))
    assert run_until_done(engine) == [Finished(1, "AB", P.FINISH_STOP, 1, 2)]


def test_stop_token_keeps_text_the_library_was_holding(model_dir: Path) -> None:
    # stop=["\n\n"]: a "\n" is held as a possible stop string, then <|end|> (an EOS)
    # ends the job; the library reports the held "\n" plus the EOS piece under "held".
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = [
        [{"stage": "streaming", "eos": False, "text": "Done."}],
        [{"stage": "streaming", "eos": False}],  # "\n" held
        [
            {
                "stage": "streaming",
                "eos": True,
                "eos_reason": "stop_token",
                "eos_triggering_token_id": 32007,
                "eos_triggering_token_str": "<|end|>",
                "held": {"text": "\n<|end|>"},
                "new_tokens": 3,
            }
        ],
    ]
    engine.add(job(1, "q", stream=True, stop=["\n\n"]))
    events = run_until_done(engine)
    assert events == [  # no token_ids in this script: counted at the end only
        Chunk(1, "Done.", 0, 1),
        Chunk(1, "\n", 3, 1),
        Finished(1, "Done.\n", P.FINISH_STOP, 1, 3),
    ]


def test_stop_string_ends_the_job_without_the_string(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = [
        [{"stage": "streaming", "eos": False, "text": "one "}],
        [
            {
                "stage": "streaming",
                "eos": True,
                "eos_reason": "stop_string",
                "eos_triggering_string": "###",
                "text": "two",
                "held": {"text": "###"},
                "new_tokens": 3,
            }
        ],
    ]
    engine.add(job(1, "q", stop=["###"]))
    assert run_until_done(engine) == [Finished(1, "one two", P.FINISH_STOP, 1, 3)]
    gen.scripts[2] = gen.scripts[1]
    engine.add(job(2, "q", stop=["###"], include_stop_str_in_output=True))
    assert run_until_done(engine) == [Finished(2, "one two###", P.FINISH_STOP, 1, 3)]


def test_vllm_extensions_reach_the_job_or_are_refused(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    engine.add(job(1, "q", stop=["###"], ignore_eos=True, min_tokens=0))
    engine.add(job(2, "q", min_tokens=4, skip_special_tokens=False))
    first, second = gen.submitted
    assert first.stop_conditions == ["###"]  # ignore_eos: no EOS ends it
    assert second.stop_conditions == [2, 32007]
    assert (second.params.min_tokens, second.params.skip_special_tokens) == (4, False)
    # The libraries' min_new_tokens holds back stop tokens only, not stop strings.
    with pytest.raises(JobRejected) as caught:
        engine.add(job(3, "q", min_tokens=4, stop=["###"]))
    assert (caught.value.code, caught.value.field) == (P.E_BAD_REQUEST, "params.min_tokens")


def test_unknown_finish_reason_is_reported_as_stop(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = token_script(["x"], eos_reason="something_new")
    engine.add(job(1, "q"))
    (finished,) = run_until_done(engine)
    assert isinstance(finished, Finished) and finished.finish_reason == P.FINISH_STOP


def test_exllamav3_job_error_fails_only_that_job(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = [[{"stage": "error", "eos": True, "error": ValueError("NaN logits\nmore")}]]
    gen.scripts[2] = token_script(["fine"])
    engine.add(job(1, "q"))
    engine.add(job(2, "q"))
    events = run_until_done(engine)
    assert Failed(1, P.E_ENGINE, "ValueError: NaN logits") in events
    assert Finished(2, "fine", P.FINISH_LENGTH, 1, 1) in events


def test_many_jobs_each_finish_exactly_once(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    for key in range(10):
        gen.scripts[key] = token_script([f"t{key}"] * (key + 1))
        engine.add(job(key, "q"))
    finished = [e for e in run_until_done(engine) if isinstance(e, Finished)]
    assert sorted(e.key for e in finished) == list(range(10))
    assert all(e.completion_tokens == e.key + 1 for e in finished)


# --- cancel, idle, capacity, threads ----------------------------------------------------------


def test_cancel_removes_the_job_and_no_event_follows(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = token_script(["a", "b", "c"])
    engine.add(job(1, "q", stream=True))
    engine.step()
    engine.cancel(1)
    assert gen.cancelled and gen.cancelled[0].spec.key == 1
    assert engine.pending == 0
    assert engine.step() == []
    engine.cancel(1)  # twice, or an unknown key: nothing happens


def test_results_for_a_cancelled_job_are_dropped(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    gen.scripts[1] = token_script(["a", "b"])
    gen.scripts[2] = token_script(["c"] * 4)
    engine.add(job(1, "q", stream=True))
    engine.add(job(2, "q", stream=True))
    engine._jobs.pop(1)  # as if cancelled after the library produced this step's results
    assert all(e.key == 2 for e in run_until_done(engine))


def test_idle_step_returns_at_once_without_iterating(model_dir: Path) -> None:
    engine, gen = make_engine(model_dir)
    assert engine.step() == [] and gen.iterations == 0


def test_capacity_is_the_batch_size_when_paged_and_one_otherwise(model_dir: Path) -> None:
    assert make_engine(model_dir, paged=True, max_batch_size=16)[0].capacity == 16
    assert make_engine(model_dir, paged=False, max_batch_size=16)[0].capacity == 1
    assert make_engine(model_dir, max_seq_len=4096)[0].max_seq_len == 4096


def test_a_second_driving_thread_is_refused(model_dir: Path) -> None:
    engine, _ = make_engine(model_dir)
    engine.add(job(1))
    errors: list[BaseException] = []

    def other() -> None:
        try:
            engine.step()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors and "thread" in str(errors[0])


# --- options and load() on this machine ---------------------------------------------------------


def test_options_are_typed_checked_and_rounded() -> None:
    opts = parse_options(
        {"cache": "Q4", "cache_tokens": "1000", "gpu_split": "20,24", "max_batch_size": "64"},
        "exllamav2",
    )
    assert (opts.cache, opts.cache_tokens, opts.gpu_split, opts.max_batch_size) == (
        "q4",
        1024,
        [20.0, 24.0],
        64,
    )
    assert parse_options({"tp": "1", "gpu_split": "20,20"}, "exllamav2").tp
    for bad in (
        {"cache": "fp8"},
        {"max_chunk_size": "1000"},
        {"autosplit": "1", "tp": "1"},
        {"autosplit": "yes", "gpu_split": "10"},
        {"gpu_split": "a,b"},
        {"nope": "1"},
        {"cache_tokens": "0"},
    ):
        with pytest.raises(EngineOptionError):
            parse_options(bad, "exllamav2")


@pytest.mark.parametrize("engine_cls", [exl2.ExLlamaV2Engine, exl3.ExLlamaV3Engine])
def test_load_refuses_bad_model_dirs_in_one_line(
    engine_cls: type[ExlEngine], tmp_path: Path
) -> None:
    for model in (None, str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(EngineUnavailable) as exc:
            engine_cls(model, {}).load()
        message = str(exc.value)
        assert message.startswith(f"{engine_cls.name} unavailable: ") and "\n" not in message


def test_load_names_the_right_engine_for_a_foreign_format(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "exl3", "bits": 4.0, "head_bits": 6}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(EngineUnavailable, match="EXL3 model: use --engine exllamav3"):
        exl2.ExLlamaV2Engine(str(model), {}).load()


def test_load_without_cuda_fails_fast_in_one_line(tmp_path: Path) -> None:
    """On this CPU-only machine: the real load() path up to the CUDA check."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU tests cover load()")
    model = write_model_dir(tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for engine_cls in (exl2.ExLlamaV2Engine, exl3.ExLlamaV3Engine):
        with pytest.raises(EngineUnavailable) as exc:
            engine_cls(str(model), {}).load()
        assert str(exc.value).startswith(f"{engine_cls.name} unavailable: no CUDA device visible")
    assert "exllamav2" not in sys.modules and "exllamav3" not in sys.modules


def test_engine_modules_import_neither_torch_nor_the_libraries() -> None:
    code = (
        "import sys, exgen.daemon.engines.exl2, exgen.daemon.engines.exl3, exgen.daemon.modelprobe;"
        "bad = {'torch', 'exllamav2', 'exllamav3'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- exllamav2: logprobs free of in-place penalties; close() frees what it holds -----------


class PenalisingJob:
    """TEST DOUBLE with ExLlamaV2DynamicJob's two step hooks as 0.3.2 runs them (read by
    test_exl_conformance.py): the sampler penalises the logits in place, then the job
    holds the logits ``receive_sample`` is given."""

    def __init__(self, return_logits: bool) -> None:
        self.return_logits = return_logits
        self.held: list[Any] = []

    def receive_logits(self, logits: Any) -> int:
        logits[0, 0, 7] -= 5.0  # ext_c.apply_rep_penalty works in place
        return int(logits.argmax())

    def receive_sample(self, logits: Any, token: int) -> None:
        self.held.append(logits[:1, :, :].clone())


class RawLogitsPenalisingJob(exl2.RawLogitsMixin, PenalisingJob):
    pass


@pytest.mark.parametrize("threads", [False, True])
def test_exllamav2_jobs_hold_the_logits_from_before_the_in_place_penalties(threads: bool) -> None:
    import torch

    steps = [torch.arange(10, dtype=torch.float).view(1, 1, 10) for _ in range(3)]
    plain, raw = PenalisingJob(True), RawLogitsPenalisingJob(True)
    for job in (plain, raw):
        for step in steps:
            logits = step.clone()  # the generator's batch buffer, reused each step
            if threads:  # a sampling thread runs receive_logits first
                with ThreadPoolExecutor(1) as pool:
                    token = pool.submit(job.receive_logits, logits).result()
            else:
                token = job.receive_logits(logits)
            job.receive_sample(logits, token)
    assert all(torch.equal(h, s) for h, s in zip(raw.held, steps, strict=True))
    assert all(h[0, 0, 7] == 2.0 for h in plain.held)  # what it returned before


def test_exllamav2_jobs_without_logprobs_copy_nothing() -> None:
    import torch

    job = RawLogitsPenalisingJob(False)
    logits = torch.arange(10, dtype=torch.float).view(1, 1, 10)
    job.receive_sample(logits, job.receive_logits(logits))
    assert job._pre_sampling is None and job.held[0][0, 0, 7] == 2.0


def test_exllamav2_close_shuts_the_generators_pools_and_drops_the_cache() -> None:
    import weakref

    class Model:
        unloaded = False

        def unload(self) -> None:
            self.unloaded = True

    class Cache:
        pass

    class Generator:
        def __init__(self, cache: Cache) -> None:
            self.cache = cache
            self.max_sampling_threads = 4
            self.sampling_pool = ThreadPoolExecutor(2)
            self.filter_pool = ThreadPoolExecutor(2)
            self.me = self  # the library's generator and jobs refer to each other

    library = object.__new__(exl2.ExLlamaV2Library)
    cache = Cache()
    generator = Generator(cache)
    pools = (generator.sampling_pool, generator.filter_pool)
    for pool in pools:
        pool.submit(lambda: None).result()  # its threads started
    library._model, library._cache, library._generator = Model(), cache, generator
    gone = weakref.ref(cache)
    del cache, generator
    library.close()
    assert library._model.unloaded and gone() is None
    assert all(pool._shutdown for pool in pools)
    for thread in (t for pool in pools for t in pool._threads):
        thread.join(timeout=10)
        assert not thread.is_alive()
