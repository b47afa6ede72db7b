"""The Engine interface: what a worker drives, shaped for continuous batching.

Modelled on ExLlamaV2's dynamic generator so it fits unchanged: jobs are added at
any time, ``step()`` advances every active job by one scheduling step and returns
what happened. Engines that batch statically (transformers' ``generate``) run a
whole batch inside one ``step()`` and fit behind the same calls.

An engine knows nothing about sockets or processes (the worker adds those). It is
driven by one thread only. Heavy libraries are imported inside ``load()`` or the
engine module itself, which is only imported inside a worker process.

Contract:
- ``load()`` once; raises :class:`EngineUnavailable` when the library or model
  cannot be loaded at all (the worker then exits with a boot-error code and is not
  restarted).
- ``capacity``: how many jobs the engine runs concurrently; the router keeps about
  this many outstanding on the worker (plus a small prefetch).
- ``add(job)``: accept a job; jobs beyond capacity wait inside the engine. A job that
  can never run (prompt too long) raises :class:`JobRejected`; the worker turns it
  into a per-item error, nothing else is affected.
- ``step()``: advance; returns events. Must return promptly when idle.
- ``cancel(key)``: drop a job; no event follows for it.
- ``close()``: free resources.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import Any

from exgen.client import protocol as P


class EngineUnavailable(RuntimeError):
    """The engine cannot load here (missing package, no GPU, bad model path)."""


class EngineOptionError(EngineUnavailable):
    """An --engine-opt the engine does not know, or a bad value for one."""


class JobRejected(ValueError):
    """This job can never run on this engine; ``code`` is a protocol error code,
    ``field`` the request field at fault, where one is."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def vocabulary_problem(ids: list[int], vocab_size: int) -> JobRejected | None:
    """A token-id prompt with an id the model has no embedding for: the job's error."""
    outside = next((t for t in ids if t >= vocab_size), None)
    if outside is None:
        return None
    message = f"token id {outside} is outside the vocabulary ({vocab_size} tokens)"
    return JobRejected(P.E_BAD_REQUEST, message, "prompt")


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = P.DEFAULT_PARAMS["max_new_tokens"]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: str | None = None  # compact JSON text (protocol-checked)
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    echo: bool = False
    prompt_logprobs: int | None = None
    add_special_tokens: bool = True

    @property
    def wants_prompt(self) -> bool:
        """The result carries the prompt (its ids and text, or its logprobs)."""
        return self.echo or self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def for_sample(self, index: int) -> SamplingParams:
        """The params of sample ``index`` of n: one sample each, the seed moved by the
        index so that seeded samples differ from each other and are reproducible."""
        seed = None if self.seed is None else (self.seed + index) % (P.MAX_SEED + 1)
        return replace(self, n=1, seed=seed)

    @classmethod
    def from_wire(cls, params: dict[str, Any]) -> SamplingParams:
        """From validated params (the router's gate): only known names, checked values."""
        return cls(**P.merged_params(params))


@dataclass(slots=True)
class Job:
    """One prompt to generate for. ``key`` is the router's id for it."""

    key: int
    prompt: str | list[int] | None  # text, or token ids (the engine's tokenizer's)
    messages: list[dict[str, str]] | None
    params: SamplingParams
    stream: bool = False


@dataclass(slots=True)
class Chunk:
    """Newly generated text of a streaming job, with the token counts so far (the
    completion's: tokens generated up to this text; the prompt's)."""

    key: int
    text: str
    completion_tokens: int = 0
    prompt_tokens: int = 0


# One generated token's log probabilities: [token text, logprob, [[alt text, logprob]...]]
# (the alternatives are the top_logprobs most likely tokens, best first). Lists, not
# objects: a result carries one per token, and they go on the wire as they are.
TokenLogprob = list[Any]


@dataclass(slots=True)
class Choice:
    """One of the n samples of a job."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "completion_tokens": self.completion_tokens,
            "logprobs": self.logprobs,
        }


@dataclass(slots=True)
class Finished:
    """A finished job. With n > 1, ``choices`` holds every sample; ``text``,
    ``finish_reason`` and ``logprobs`` are the first one's and ``completion_tokens``
    counts all of them (as OpenAI's usage does)."""

    key: int
    text: str
    finish_reason: str  # protocol.FINISH_STOP or FINISH_LENGTH
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    choices: list[Choice] | None = None
    prompt: PromptEcho | None = None  # where the params asked (echo, prompt_logprobs)
    cached_tokens: int = 0  # leading prompt tokens reused from a prefix cache


# One prompt token's log probability: [id, text, logprob, rank, [[alt id, alt text,
# logprob]...]]; the first token's logprob and rank are None (nothing precedes it).
PromptLogprob = list[Any]


@dataclass(slots=True)
class PromptEcho:
    """The prompt as the engine saw it: token ids, their text, their logprobs."""

    ids: list[int]
    text: str
    logprobs: list[PromptLogprob] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"ids": self.ids, "text": self.text, "logprobs": self.logprobs}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> PromptEcho:
        return cls(list(raw["ids"]), str(raw["text"]), raw.get("logprobs"))


@dataclass(slots=True)
class Failed:
    """This job failed on its own (the engine goes on with the others)."""

    key: int
    code: str
    message: str
    field: str | None = None  # the request field at fault (e.g. params.json_schema)


def finished_from_choices(key: int, prompt_tokens: int, choices: list[Choice]) -> Finished:
    """One Finished for the n samples of a job (n = 1: a plain one)."""
    first = choices[0]
    if len(choices) == 1:  # the common case: no sum, no list of samples
        return Finished(
            key, first.text, first.finish_reason, prompt_tokens, first.completion_tokens,
            first.logprobs,
        )  # fmt: skip
    completion_tokens = sum(c.completion_tokens for c in choices)
    return Finished(
        key, first.text, first.finish_reason, prompt_tokens, completion_tokens,
        first.logprobs, choices,
    )  # fmt: skip


Event = Chunk | Finished | Failed


def find_stop(text: str, stops: list[str], floor: int = 0) -> tuple[int, int] | None:
    """(start, end) of the first stop string in ``text`` that ends past its first
    ``floor`` characters: text written before ``min_tokens`` cannot end a job (vLLM's
    rule), though a stop string may begin there."""
    best: tuple[int, int] | None = None
    for stop in stops:
        start = text.find(stop, max(0, floor - len(stop) + 1))
        if start >= 0 and (best is None or start < best[0]):
            best = (start, start + len(stop))
    return best


def text_to_stop(text: str, found: tuple[int, int], params: SamplingParams) -> str:
    """The text a stop string ends: up to it, or through it with include_stop_str_in_output."""
    return text[: found[1] if params.include_stop_str_in_output else found[0]]


class Engine(abc.ABC):
    """One model replica, driven by one worker thread."""

    name: str = "abstract"
    # Engines whose step() can run long (a whole static batch) bump this once per
    # decoded token; the worker's heartbeat thread reads it, so the router's progress
    # deadline sees a long step as alive. A plain int: safe to read from that thread.
    decode_steps: int = 0

    def __init__(self, model: str | None, options: dict[str, str]) -> None:
        self.model = model
        self.options = dict(options)

    @abc.abstractmethod
    def load(self) -> None: ...

    @property
    @abc.abstractmethod
    def capacity(self) -> int: ...

    @property
    def max_seq_len(self) -> int | None:
        """Context length in tokens, where the engine knows it."""
        return None

    @abc.abstractmethod
    def add(self, job: Job) -> None: ...

    @abc.abstractmethod
    def step(self) -> list[Event]: ...

    @abc.abstractmethod
    def cancel(self, key: int) -> None: ...

    @property
    @abc.abstractmethod
    def pending(self) -> int:
        """Jobs added and not yet finished, failed or cancelled."""

    def describe(self) -> dict[str, Any]:
        """Facts for the READY message and status (model name, dtype, devices...)."""
        return {}

    def counters(self) -> dict[str, int]:
        """Running totals for the heartbeat (prefix-cache hits, prefill tokens saved...);
        read from the heartbeat thread, so a copy of plain ints."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def take_options(
    options: dict[str, str], spec: dict[str, tuple[type, Any]], engine: str
) -> dict[str, Any]:
    """Typed engine options from ``KEY=VALUE`` strings; unknown keys are refused.

    ``spec`` maps a name to (type, default). bool accepts 1/0/true/false/yes/no.
    """
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise EngineOptionError(
            f"{engine}: unknown engine option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(spec))})"
        )
    out: dict[str, Any] = {}
    for name, (kind, default) in spec.items():
        if name not in options:
            out[name] = default
            continue
        raw = options[name]
        try:
            out[name] = _convert_option(raw, kind)
        except ValueError:
            raise EngineOptionError(
                f"{engine}: engine option {name}={raw!r} is not a valid {kind.__name__}"
            ) from None
    return out


def _convert_option(raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return kind(raw)
