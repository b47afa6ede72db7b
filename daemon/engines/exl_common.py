"""What the ExLlamaV2 and ExLlamaV3 engines share, written without either library.

Both libraries drive generation the same way: a generator that jobs are enqueued
into, and an ``iterate()`` that returns a list of result dicts (``stage``, ``eos``,
``text``, ``eos_reason``, ``new_tokens``, ``prompt_tokens``, ``identifier``...).
So the engine logic lives here once — prompt rendering, the length check, stop
conditions, job bookkeeping and the translation of result dicts into events — and
each library module adds only a thin :class:`LibraryAdapter` that loads the model and
builds the library's own job objects. Tests drive this logic with a scripted adapter.

Nothing here imports torch, exllamav2 or exllamav3: this module is imported by the
conformance tests and by ``models inspect`` on machines that have none of them.
"""

from __future__ import annotations

import abc
import importlib.metadata
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from exgen.client import protocol as P
from exgen.daemon.engines.base import (
    Choice,
    Chunk,
    Engine,
    EngineOptionError,
    EngineUnavailable,
    Event,
    Failed,
    Finished,
    Job,
    JobRejected,
    SamplingParams,
    TokenLogprob,
    finished_from_choices,
    take_options,
    vocabulary_problem,
)
from exgen.daemon.engines.grammar import Grammars, SchemaMatcher
from exgen.daemon.modelprobe import FORMAT_NAMES, ModelInspectError, inspect_model, read_json

log = logging.getLogger(__name__)

# Both generators page their cache in blocks of 256 tokens: the cache size must be a
# multiple of it, and so must the prefill chunk in paged mode.
PAGE_SIZE = 256
CACHE_TYPES = ("fp16", "q4", "q6", "q8")
# Finish reasons the libraries report in ``eos_reason``; everything but the token
# budget running out is a natural stop.
LENGTH_REASONS = frozenset({"max_new_tokens"})
STOP_REASONS = frozenset({"stop_token", "stop_string", "end_filter", "loop_detected"})


# --- declared library surface (checked against the installed sources by the tests) ---


@dataclass(frozen=True, slots=True)
class ApiUse:
    """One name an engine uses in its library, exactly as the engine uses it.

    ``target`` is ``module:Qualname`` (``exllamav2:ExLlamaV2DynamicJob``, or a nested
    class ``exllamav2.generator:ExLlamaV2Sampler.Settings``), or ``module:`` for a
    module-level name. ``member`` is a method (``kind="method"``, ``kwargs`` are the
    keyword arguments we pass), an attribute we read or set (``kind="attr"``), a
    module-level name (``kind="module_attr"``), or the dataclass fields we set
    (``kind="fields"``). ``via`` names the ``module:Qualname.method`` whose signature
    takes ``kwargs`` when ``member`` only forwards them through ``**kwargs``.
    """

    target: str
    member: str | None = None
    kind: str = "class"
    kwargs: tuple[str, ...] = ()
    via: str | None = None


# --- small helpers -----------------------------------------------------------------


def first_line(exc: BaseException, limit: int = 300) -> str:
    """One line for a log or an error reply: the type and the first line of the text."""
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    line = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return line[:limit]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def eos_token_ids(model_dir: Path, tokenizer_eos: int | None) -> list[int]:
    """Every end-of-sequence id the model may emit.

    The libraries' tokenizers keep only the first EOS (exllamav2 takes ``[0]`` of a
    list); chat models often end turns with a second one (Llama 3's ``<|eot_id|>``),
    listed in generation_config.json. Missing it means generating past the answer.
    """
    ids: list[int] = []
    gen = read_json(model_dir / "generation_config.json")
    cfg = read_json(model_dir / "config.json")
    values = [gen.get("eos_token_id"), cfg.get("eos_token_id")]
    text_cfg = cfg.get("text_config")  # multimodal wrappers nest the language model's
    if isinstance(text_cfg, dict):
        values.append(text_cfg.get("eos_token_id"))
    for value in values:
        ids.extend(_as_id_list(value))
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    return sorted(set(ids))


def stop_conditions(eos_ids: list[int], stop_strings: list[str]) -> list[int | str]:
    """The libraries take token ids and strings in one list; both end the job."""
    return [*eos_ids, *stop_strings]


# --- prompts -----------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken map."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_from(tok_cfg: dict[str, Any], model_dir: Path) -> str | None:
    """The chat template: tokenizer_config.json's, or chat_template.jinja (newer HF)."""
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name", "template"}...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return None


def _post_processor_adds_bos(tokenizer_json: dict[str, Any]) -> bool:
    """Whether tokenizer.json's post-processor puts a special token before the text,
    which is how HF tokenizers add BOS to a plain prompt (Llama 3 does this)."""
    stack = [tokenizer_json.get("post_processor")]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "TemplateProcessing":
            single = node.get("single") or []
            return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
        stack.extend(node.get("processors") or [])
    return False


@dataclass(slots=True)
class PromptBuilder:
    """Turns a job's prompt or chat messages into the text to tokenize, as HF would.

    Chat messages are rendered with the model's jinja chat template (the libraries
    have none); a plain prompt gets BOS where the HF tokenizer would add it, so the
    tokens match what ``transformers`` feeds the same model.
    """

    chat_template: str | None
    special_tokens: dict[str, str]
    plain_adds_bos: bool
    _compiled: Any = field(default=None, repr=False)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> PromptBuilder:
        tok_cfg = read_json(model_dir / "tokenizer_config.json")
        specials = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(tok_cfg.get(name))
            if text is not None:
                specials[name] = text
        adds_bos = tok_cfg.get("add_bos_token")
        if not isinstance(adds_bos, bool):
            adds_bos = _post_processor_adds_bos(read_json(model_dir / "tokenizer.json"))
        return cls(_template_from(tok_cfg, model_dir), specials, adds_bos)

    def text_for(self, job: Job) -> tuple[str, bool]:
        """(text, add_bos). Raises JobRejected for messages this model cannot take."""
        if job.messages is None:
            assert not isinstance(job.prompt, list), "token ids are not text to tokenize"
            return job.prompt or "", self.plain_adds_bos
        # A rendered template carries its own BOS (HF tokenizes it without adding one).
        return self.render_chat(job.messages), False

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise JobRejected(
                P.E_BAD_REQUEST,
                "this model has no chat template (tokenizer_config.json): send a plain prompt",
            )
        import jinja2  # light, but only workers with chat jobs need it

        try:
            template = self._template()
            return str(
                template.render(
                    messages=messages, add_generation_prompt=True, **self.special_tokens
                )
            )
        except jinja2.TemplateError as exc:
            # raise_exception() in templates reports bad conversations this way
            raise JobRejected(P.E_BAD_REQUEST, f"chat template: {exc}") from None

    def _template(self) -> Any:
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template or "")
        return self._compiled


def compile_chat_template(source: str) -> Any:
    """A jinja template in the environment HF's apply_chat_template uses: sandboxed,
    trim/lstrip blocks, loop controls, a non-escaping tojson, raise_exception."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


# --- options -----------------------------------------------------------------------

OPTION_SPEC: dict[str, tuple[type, Any]] = {
    "cache": (str, "fp16"),  # KV cache type: fp16, q4, q6, q8
    "cache_tokens": (int, 32768),  # KV pages shared by all jobs (rounded up to 256)
    "max_batch_size": (int, 32),  # jobs generating at once (the engine's capacity)
    "max_chunk_size": (int, 2048),  # prompt tokens ingested per forward pass
    "max_seq_len": (int, 0),  # 0: the model's context length
    "gpu_split": (str, ""),  # GB per visible device, e.g. "20,24"
    "autosplit": (bool, False),  # fill visible devices in order (lazy cache)
    "tp": (bool, False),  # tensor parallel over the slot's devices
}


@dataclass(frozen=True, slots=True)
class ExlOptions:
    cache: str
    cache_tokens: int
    max_batch_size: int
    max_chunk_size: int
    max_seq_len: int
    gpu_split: list[float] | None
    autosplit: bool
    tp: bool


def parse_options(options: dict[str, str], engine: str) -> ExlOptions:
    """Typed, checked ``--engine-opt`` values; an EngineOptionError names what is wrong."""
    raw = take_options(options, OPTION_SPEC, engine)
    cache = str(raw["cache"]).lower()
    if cache not in CACHE_TYPES:
        raise EngineOptionError(
            f"{engine}: cache={cache!r}: choose one of {', '.join(CACHE_TYPES)}"
        )
    for name in ("cache_tokens", "max_batch_size", "max_chunk_size"):
        if raw[name] < 1:
            raise EngineOptionError(f"{engine}: {name} must be at least 1")
    if raw["max_seq_len"] < 0:
        raise EngineOptionError(f"{engine}: max_seq_len must be 0 (the model's) or positive")
    if raw["max_chunk_size"] % PAGE_SIZE:
        raise EngineOptionError(f"{engine}: max_chunk_size must be a multiple of {PAGE_SIZE}")
    split = _parse_split(raw["gpu_split"], engine)
    if raw["autosplit"] and (split is not None or raw["tp"]):
        raise EngineOptionError(f"{engine}: autosplit cannot be combined with gpu_split or tp")
    return ExlOptions(
        cache=cache,
        # The generators refuse a cache that is not a whole number of pages.
        cache_tokens=round_up(raw["cache_tokens"], PAGE_SIZE),
        max_batch_size=raw["max_batch_size"],
        max_chunk_size=raw["max_chunk_size"],
        max_seq_len=raw["max_seq_len"],
        gpu_split=split,
        autosplit=raw["autosplit"],
        tp=raw["tp"],
    )


def _parse_split(text: str, engine: str) -> list[float] | None:
    if not text.strip():
        return None
    try:
        split = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise EngineOptionError(
            f"{engine}: gpu_split={text!r}: give GB per visible device, e.g. 20,24"
        ) from None
    if not split or any(x < 0 for x in split):
        raise EngineOptionError(f"{engine}: gpu_split={text!r}: GB values must be positive")
    return split


# --- the adapter the engine drives ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One library job (one sample of a request's n) as the library needs it: token
    ids and every generation setting. ``grammar`` makes a fresh matcher of the job's
    JSON Schema (None: free text); ``top_logprobs`` is None when no logprobs are wanted."""

    key: int
    input_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop_conditions: list[int | str]
    index: int = 0  # which of the n samples
    grammar: Callable[[], SchemaMatcher] | None = None
    top_logprobs: int | None = None

    @property
    def identifier(self) -> tuple[int, int]:
        """The library job's identifier: our key and the sample index."""
        return (self.key, self.index)


class LibraryAdapter(Protocol):
    """The thin, library-touching side of an engine (one per library, plus the
    scripted test double). Called from the engine's one driving thread only."""

    paged: bool
    max_batch_size: int
    max_seq_len: int  # the longest prompt + completion one job may have
    eos_token_id: int | None
    vocab_size: int  # the width of the logits (a grammar's mask covers it)

    def encode(self, text: str, add_bos: bool) -> list[int]: ...

    def submit(self, spec: JobSpec) -> Any:
        """Build the library job and enqueue it; returns the library's job object."""

    def cancel(self, handle: Any) -> None: ...

    def iterate(self) -> list[dict[str, Any]]: ...

    def token_logprobs(self, result: dict[str, Any], top: int) -> list[TokenLogprob]:
        """The logprobs of the tokens a result dict (or its ``held`` part) carries."""

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Sample:
    """One library job: one of a request's n samples."""

    handle: Any
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    done: Choice | None = None
    tokens: int = 0  # generated so far: what a chunk's usage counts


@dataclass(slots=True)
class _Running:
    stream: bool
    prompt_tokens: int
    samples: list[_Sample]
    top_logprobs: int | None = None
    keep_stop: bool = False  # include_stop_str_in_output

    def handles(self) -> list[Any]:
        return [s.handle for s in self.samples if s.done is None]


class ExlEngine(Engine, abc.ABC):
    """The engine logic both exllama engines share, over a :class:`LibraryAdapter`."""

    library = "exllama"

    def __init__(self, model: str | None, options: dict[str, str]) -> None:
        super().__init__(model, options)
        self._adapter: LibraryAdapter | None = None
        self._prompts: PromptBuilder | None = None
        self._eos_ids: list[int] = []
        self._jobs: dict[int, _Running] = {}
        self._thread: int | None = None
        self._grammars: Grammars | None = None  # built on the first JSON Schema job
        self._model_path = Path(".")

    # -- lifecycle --

    # Model formats this engine's library cannot read (checked before the slow import).
    foreign_formats: frozenset[str] = frozenset()

    def load(self) -> None:
        opts = parse_options(self.options, self.name)
        model_dir = self._model_dir()
        try:
            info = inspect_model(model_dir)
            prompts = PromptBuilder.from_model_dir(model_dir)
        except ModelInspectError as exc:
            raise EngineUnavailable(f"{self.name} unavailable: {exc}") from None
        if info.format in self.foreign_formats:
            raise EngineUnavailable(
                f"{self.name} unavailable: {model_dir} is an {FORMAT_NAMES[info.format]} model: "
                f"use --engine {info.engines[0]}"
            )
        adapter = self._open_library(model_dir, opts)
        self.attach(adapter, prompts, model_dir)

    def attach(self, adapter: LibraryAdapter, prompts: PromptBuilder, model_dir: Path) -> None:
        """Start driving a loaded library (``load()`` ends here; tests call it directly)."""
        self._adapter = adapter
        self._prompts = prompts
        self._model_path = model_dir
        self._eos_ids = eos_token_ids(model_dir, adapter.eos_token_id)
        if not adapter.paged:
            log.warning(
                "%s: paged attention unavailable (needs flash-attn >= 2.5.7 on an Ampere or "
                "newer GPU): running unpaged, one job at a time",
                self.name,
            )
        log.info(
            "%s ready: capacity %d, max_seq_len %d, eos ids %s",
            self.name,
            self.capacity,
            adapter.max_seq_len,
            self._eos_ids,
        )

    @abc.abstractmethod
    def _open_library(self, model_dir: Path, opts: ExlOptions) -> LibraryAdapter:
        """Import the library, load the model; raise EngineUnavailable saying why not."""

    def _model_dir(self) -> Path:
        """The model directory, checked before the slow library import."""
        if not self.model:
            raise EngineUnavailable(f"{self.name} unavailable: no --model directory given")
        path = Path(self.model).expanduser()
        if not path.is_dir():
            raise EngineUnavailable(f"{self.name} unavailable: model directory {path} not found")
        missing = [n for n in ("config.json", "tokenizer.json") if not (path / n).is_file()]
        if missing:
            raise EngineUnavailable(
                f"{self.name} unavailable: {path} has no {' or '.join(missing)} "
                "(a model directory with its tokenizer is needed)"
            )
        if not any(path.glob("*.safetensors")):
            raise EngineUnavailable(f"{self.name} unavailable: {path} has no .safetensors weights")
        return path

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()
            self._adapter = None
        self._jobs.clear()

    # -- facts --

    @property
    def capacity(self) -> int:
        adapter = self._require()
        return adapter.max_batch_size if adapter.paged else 1

    @property
    def max_seq_len(self) -> int | None:
        return None if self._adapter is None else self._adapter.max_seq_len

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def describe(self) -> dict[str, Any]:
        info = {"library": self.library}
        if self._adapter is not None:
            info.update(self._adapter.describe())
        return info

    # -- driving --

    def add(self, job: Job) -> None:
        adapter = self._require()
        self._check_thread()
        if job.key in self._jobs:
            raise JobRejected(P.E_INTERNAL, f"job key {job.key} is already running")
        ids = self._encode(adapter, job)
        params = job.params
        self._check_length(len(ids), params.max_new_tokens, adapter.max_seq_len)
        if params.wants_prompt or params.max_new_tokens == 0:
            # The libraries' generators return generated tokens' logits, not the prompt's.
            raise JobRejected(
                P.E_BAD_REQUEST,
                f"{self.name} cannot return the prompt (echo, prompt logprobs) or run a "
                "job of max_tokens 0 yet",
                _prompt_field(params),
            )
        if params.min_tokens and params.stop:
            # The libraries' min_new_tokens holds stop tokens back, not stop strings.
            raise JobRejected(
                P.E_BAD_REQUEST,
                f"{self.name} cannot hold stop strings back until min_tokens: "
                "give min_tokens or stop, not both",
                "params.min_tokens",
            )
        eos_ids = [] if params.ignore_eos else self._eos_ids
        grammar = None
        if params.json_schema is not None:
            grammar = self._grammar_for(params.json_schema)
        top = params.top_logprobs if params.wants_logprobs else None
        running = _Running(job.stream, len(ids), [], top, params.include_stop_str_in_output)
        # n samples are n library jobs on one prompt: the generators share the prompt's
        # full cache pages between them (page hashing), so those are prefilled once.
        for index in range(params.n):
            spec = JobSpec(
                key=job.key,
                input_ids=ids,
                max_new_tokens=params.max_new_tokens,
                params=params.for_sample(index) if params.n > 1 else params,
                stop_conditions=stop_conditions(eos_ids, params.stop),
                index=index,
                grammar=grammar,
                top_logprobs=top,
            )
            try:
                running.samples.append(_Sample(adapter.submit(spec)))
            except AssertionError as exc:  # enqueue asserts when a job cannot fit the cache
                for handle in running.handles():
                    adapter.cancel(handle)
                raise JobRejected(
                    P.E_ENGINE, f"{self.name} refused the job: {first_line(exc)}"
                ) from None
        self._jobs[job.key] = running

    def _encode(self, adapter: LibraryAdapter, job: Job) -> list[int]:
        if isinstance(job.prompt, list):  # the model's token ids, as a client's tokenizer gave them
            problem = vocabulary_problem(job.prompt, adapter.vocab_size)
            if problem is not None:
                raise problem
            return list(job.prompt)
        text, add_bos = self._prompts_or_fail().text_for(job)
        return adapter.encode(text, add_bos and job.params.add_special_tokens)

    def _grammar_for(self, schema: str) -> Callable[[], SchemaMatcher]:
        """A maker of matchers for this schema, compiled (once per worker) now, so a
        schema that cannot be compiled is this job's error before anything runs."""
        grammars = self._grammars
        if grammars is None:
            adapter = self._require()
            text = (self._model_path / "tokenizer.json").read_text(encoding="utf-8")
            grammars = Grammars.from_tokenizer_json(text, self._eos_ids, adapter.vocab_size)
            self._grammars = grammars
        grammars.compile(schema)
        return lambda: grammars.matcher(schema)

    @staticmethod
    def _check_length(prompt_tokens: int, max_new_tokens: int, limit: int) -> None:
        if prompt_tokens == 0:
            raise JobRejected(P.E_BAD_REQUEST, "the prompt is empty after tokenization")
        if prompt_tokens + max_new_tokens > limit:
            raise JobRejected(
                P.E_PROMPT_TOO_LONG,
                f"prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{prompt_tokens + max_new_tokens}, over this model's limit of {limit} tokens",
            )

    def cancel(self, key: int) -> None:
        self._check_thread()
        running = self._jobs.pop(key, None)
        if running is not None and self._adapter is not None:
            for handle in running.handles():
                self._adapter.cancel(handle)

    def step(self) -> list[Event]:
        self._check_thread()
        if not self._jobs:
            return []  # idle: return at once, the worker polls its socket
        events: list[Event] = []
        for result in self._require().iterate():
            events.extend(self._translate(result))
        return events

    def _translate(self, result: dict[str, Any]) -> list[Event]:
        ident = result_key(result)
        running = None if ident is None else self._jobs.get(ident[0])
        if running is None or ident is None or ident[1] >= len(running.samples):
            return []  # a job we cancelled, or a library-internal result
        key, index = ident
        sample = running.samples[index]
        if sample.done is not None:
            return []
        if running.top_logprobs is not None and result.get("stage") == "streaming":
            self._collect_logprobs(sample, result, running.top_logprobs)
        stream = running.stream and index == 0  # n > 1 streams the first sample
        sample.tokens += token_count(result)
        events, done = translate_result(
            key,
            result,
            stream,
            sample.parts,
            running.prompt_tokens,
            running.keep_stop,
            sample.tokens,
        )
        if not done:
            return events
        finished = [e for e in events if isinstance(e, Finished)]
        if not finished:  # the sample failed: so does the job, its other samples go
            sample.done = Choice("", P.FINISH_ERROR, 0)
            self.cancel(key)
            return events
        end = finished[0]
        logprobs = None
        if sample.logprobs is not None:
            logprobs = logprobs_for_text(sample.logprobs, end.text)
        sample.done = Choice(end.text, end.finish_reason, end.completion_tokens, logprobs)
        events = [e for e in events if not isinstance(e, Finished)]
        if all(s.done is not None for s in running.samples):
            del self._jobs[key]
            choices = [s.done for s in running.samples if s.done is not None]
            events.append(finished_from_choices(key, end.prompt_tokens, choices))
        return events

    def _collect_logprobs(self, sample: _Sample, result: dict[str, Any], top: int) -> None:
        adapter = self._require()
        entries = sample.logprobs if sample.logprobs is not None else []
        entries.extend(adapter.token_logprobs(result, top))
        held = result.get("held")
        if result.get("eos") and isinstance(held, dict):
            entries.extend(adapter.token_logprobs(held, top))
        sample.logprobs = entries

    # -- guards --

    def _require(self) -> LibraryAdapter:
        if self._adapter is None:
            raise RuntimeError(f"{self.name}: load() first")
        return self._adapter

    def _prompts_or_fail(self) -> PromptBuilder:
        if self._prompts is None:
            raise RuntimeError(f"{self.name}: load() first")
        return self._prompts

    def _check_thread(self) -> None:
        # The generators are not thread-safe: one thread must drive everything.
        me = threading.get_ident()
        if self._thread is None:
            self._thread = me
        elif self._thread != me:
            raise RuntimeError(
                f"{self.name}: driven from two threads; the generator is not thread-safe"
            )


# --- result dicts -> events ------------------------------------------------------------


def result_key(result: dict[str, Any]) -> tuple[int, int] | None:
    """Our job key and sample index: the ``identifier`` we gave the library job.
    ExLlamaV3's error results carry only the job object, so fall back to its
    ``identifier`` attribute."""
    ident = result.get("identifier")
    if ident is None:
        ident = getattr(result.get("job"), "identifier", None)
    if isinstance(ident, tuple) and len(ident) == 2 and all(type(v) is int for v in ident):
        return ident[0], ident[1]
    return None


def logprobs_for_text(entries: list[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The entries of the tokens that make ``text``: the library also reports the
    stop token (no text) and the tokens a stop string cut off."""
    out: list[TokenLogprob] = []
    length = 0
    for entry in entries:
        piece = str(entry[0])
        if not piece or length + len(piece) > len(text):
            break
        out.append(entry)
        length += len(piece)
    return out


def translate_result(
    key: int,
    result: dict[str, Any],
    stream: bool,
    parts: list[str],
    prompt_tokens: int,
    keep_stop: bool = False,
    tokens: int = 0,
) -> tuple[list[Event], bool]:
    """Events for one result dict, and whether the job is done. ``parts`` collects the
    job's text so far, so the final text is exactly what was streamed; ``keep_stop``:
    the stop string that ended it is text too (include_stop_str_in_output)."""
    stage = result.get("stage")
    if stage == "error":  # ExLlamaV3 contains a job's own failure this way
        return [
            Failed(key, P.E_ENGINE, first_line(result.get("error") or RuntimeError("job failed")))
        ], True
    if stage != "streaming":
        return [], False  # "started", "prefill": progress only
    events: list[Event] = []
    text = str(result.get("text") or "")
    if result.get("eos"):
        text += recovered_held_text(result)
        tokens = int(result.get("new_tokens") or tokens)  # the library's own count
        if keep_stop and result.get("eos_reason") == "stop_string":
            text += str(result.get("eos_triggering_string") or "")
    if text:
        parts.append(text)
        if stream:
            events.append(Chunk(key, text, tokens, prompt_tokens))
    if not result.get("eos"):
        return events, False
    events.append(
        Finished(
            key=key,
            text="".join(parts),
            finish_reason=finish_reason(result.get("eos_reason")),
            prompt_tokens=int(result.get("prompt_tokens") or prompt_tokens),
            completion_tokens=int(result.get("new_tokens") or 0),
        )
    )
    return events, True


def _prompt_field(params: SamplingParams) -> str:
    if params.prompt_logprobs is not None:
        return "params.prompt_logprobs"
    return "params.echo" if params.echo else "params.max_new_tokens"


def token_count(result: dict[str, Any]) -> int:
    """Tokens a streaming result emits: its ``token_ids``, shape (1, n)."""
    ids = result.get("token_ids")
    shape = getattr(ids, "shape", None)
    return int(shape[-1]) if shape else 0


def recovered_held_text(result: dict[str, Any]) -> str:
    """Text the library was still holding back when a stop *token* ended the job.

    On a stop token both libraries finish without emitting held text (a partial stop
    string, an incomplete character), and report it under ``held`` together with the
    stop token's own piece. That text is output the user asked for; the stop token's
    piece is not.
    """
    if result.get("eos_reason") != "stop_token":
        return ""
    held = result.get("held")
    text = str(held.get("text") or "") if isinstance(held, dict) else ""
    piece = str(result.get("eos_triggering_token_str") or "")
    if piece and text.endswith(piece):
        text = text[: -len(piece)]
    return text


def finish_reason(eos_reason: Any) -> str:
    if eos_reason in LENGTH_REASONS:
        return P.FINISH_LENGTH
    if eos_reason not in STOP_REASONS:
        log.warning("unknown eos_reason %r from the generator; reporting it as a stop", eos_reason)
    return P.FINISH_STOP


# --- loading helpers (called inside load() only) -------------------------------------


def require_cuda(library: str) -> int:
    """Visible CUDA devices, or EngineUnavailable — checked before the library import,
    which is slow (exllamav2 compiles its extension) and fails obscurely without CUDA."""
    try:
        import torch
    except ImportError as exc:
        raise EngineUnavailable(f"{library} unavailable: torch: {first_line(exc)}") from None
    devices = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    if devices == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise EngineUnavailable(f"{library} unavailable: no CUDA device visible{where}")
    return devices


def installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def warn_version(dist: str, pinned: str) -> None:
    """The library version differs from the one the conformance tests pin: say so."""
    installed = installed_version(dist)
    if installed != pinned:
        log.warning("%s %s installed; exgen is verified against %s", dist, installed, pinned)
