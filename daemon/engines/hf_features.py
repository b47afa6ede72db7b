"""What a transformers batch adds per row for its features: JSON Schema masks, OpenAI's
presence/frequency penalties, logprobs; and the n samples of a job gathered into one
result. Hooks of :class:`hf_decode.DecodeBatch`, kept apart from its decode loop.

Per step, in this order (vLLM's): logprobs are taken from the model's logits as they
are; then the penalties and each constrained row's mask (a row's schema is its own, so
rows with different schemas or none share a batch); then the batch's logits
processors (repetition penalty, temperature, top-k/top-p: masking before them means
top-k never keeps only forbidden tokens); then the choice, which each matcher consumes.

Penalties count the tokens each row generated (OpenAI's "the text so far", as vLLM
counts them; the exllama samplers count the prompt too), recounted from the batch's
sequences every step, so rows leaving the batch need no bookkeeping here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.engines import grammar
from exgen.daemon.engines.base import (
    Choice,
    Chunk,
    Event,
    Failed,
    Finished,
    Job,
    SamplingParams,
    TokenLogprob,
    finished_from_choices,
)
from exgen.daemon.engines.grammar import SchemaMatcher, mask_words, masked
from exgen.daemon.engines.logprobs import logprob_entries


@dataclass(slots=True)
class RowExtras:
    """One row's share: its sample index, matcher and logprobs so far."""

    index: int = 0
    matcher: SchemaMatcher | None = None
    top_logprobs: int | None = None  # None: no logprobs
    logprobs: list[TokenLogprob] = field(default_factory=list)
    failure: str | None = None  # the matcher's error: the row fails with it


class BatchFeatures:
    """The per-step hooks for one batch (``torch`` passed in; ``piece`` decodes a token)."""

    def __init__(self, torch: Any, params: SamplingParams, piece: Any) -> None:
        self.torch = torch
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.piece = piece
        self._raw: Any = None  # this step's log-softmax rows, for the rows that want them
        self._words: Any = None

    def observe(self, extras: list[RowExtras], logits: Any) -> None:
        """Keep the model's own distribution for the rows that report logprobs."""
        self._raw = None
        if any(e.top_logprobs is not None for e in extras):
            self._raw = logits

    def constrain(self, extras: list[RowExtras], scores: Any, generated: Any) -> Any:
        """Penalties for every row, then each constrained row's schema mask."""
        torch = self.torch
        if (self.presence or self.frequency) and generated.shape[1]:
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores)
        matchers = [
            (i, e.matcher) for i, e in enumerate(extras) if e.matcher is not None and not e.failure
        ]
        if not matchers:
            return scores
        shape = (len(matchers), mask_words(matchers[0][1].vocab_size))
        if self._words is None or tuple(self._words.shape) != shape:
            self._words = torch.empty(shape, dtype=torch.int32)
        for j, (_, matcher) in enumerate(matchers):
            matcher.fill_mask(self._words[j])
        if len(matchers) == len(extras):  # the common case: a batch of schema jobs
            return masked(torch, scores, self._words)  # out of place: logprobs see the raw
        index = torch.tensor([i for i, _ in matchers], device=scores.device)
        scores = scores.clone()  # the logits kept for logprobs stay the model's own
        scores[index] = masked(torch, scores[index], self._words)
        return scores

    def chosen(self, extras: list[RowExtras], tokens: list[int], done: list[bool]) -> None:
        """Record each live row's logprobs and feed its matcher the chosen token."""
        raw = self._raw
        wanting = [i for i, e in enumerate(extras) if e.top_logprobs is not None and not done[i]]
        if raw is not None and wanting:
            top = max(extras[i].top_logprobs or 0 for i in wanting)
            index = self.torch.tensor(wanting, device=raw.device)
            entries = logprob_entries(
                self.torch, raw[index], [tokens[i] for i in wanting], top, self.piece
            )
            for i, entry in zip(wanting, entries, strict=True):
                entry[2] = entry[2][: extras[i].top_logprobs]
                extras[i].logprobs.append(entry)
        for i, e in enumerate(extras):
            if e.matcher is not None and not done[i] and e.failure is None:
                e.matcher.consume(tokens[i])
                e.failure = e.matcher.error


def text_logprobs(extras: RowExtras, tokens: int, ends_with_eos: bool) -> list[TokenLogprob] | None:
    """A finished row's logprobs: one per token of its text (not the EOS)."""
    if extras.top_logprobs is None:
        return None
    return extras.logprobs[: tokens - 1 if ends_with_eos else tokens]


class JobSamples:
    """A job's n samples as n rows: rows 1..n-1 (and row 0) run under internal keys
    (negative: never a router key), and their results are gathered back into one
    result under the job's key. n = 1 jobs pass through untouched."""

    def __init__(self) -> None:
        self._next = -1
        self._sample: dict[int, tuple[int, int, int]] = {}  # internal -> (key, index, n)
        self._internal: dict[int, list[int]] = {}  # key -> its internal keys
        self._choices: dict[int, dict[int, Choice]] = {}

    def rows_of(self, job: Job) -> list[tuple[Job, int]]:
        """(the row's job, sample index) for each of the job's n samples. The first
        streams; each has its own seed (a seeded job's batch draws once, see hf.py)."""
        n = job.params.n
        if n == 1:
            return [(job, 0)]
        self.forget(job.key)  # a job run again (after an out-of-memory retry)
        out = []
        for index in range(n):
            internal = self._next
            self._next -= 1
            self._sample[internal] = (job.key, index, n)
            self._internal.setdefault(job.key, []).append(internal)
            params = job.params.for_sample(index)
            out.append(
                (replace(job, key=internal, params=params, stream=job.stream and not index), index)
            )
        return out

    def job_key(self, key: int) -> int:
        sample = self._sample.get(key)
        return key if sample is None else sample[0]

    def keys_of(self, key: int) -> list[int]:
        """The keys the job's rows run under."""
        return list(self._internal.get(key, [key]))

    def translate(self, events: list[Event]) -> tuple[list[Event], list[int]]:
        """Events under the jobs' keys (n > 1: one result when the last sample is in),
        and the internal keys to cancel (the other samples of a job that failed)."""
        out: list[Event] = []
        cancel: list[int] = []
        for event in events:
            sample = self._sample.get(event.key)
            if sample is None:
                out.append(event)
                continue
            key, index, n = sample
            if isinstance(event, Chunk):
                out.append(Chunk(key, event.text))
            elif isinstance(event, Failed):
                cancel += [k for k in self.keys_of(key) if k != event.key]
                self.forget(key)
                out.append(Failed(key, event.code, event.message, event.field))
            elif isinstance(event, Finished):
                done = self._gather(key, index, n, event)
                if done is not None:
                    out.append(done)
        return out, cancel

    def _gather(self, key: int, index: int, n: int, event: Finished) -> Finished | None:
        got = self._choices.setdefault(key, {})
        got[index] = Choice(
            event.text, event.finish_reason, event.completion_tokens, event.logprobs
        )
        if len(got) < n:
            return None
        choices = [got[i] for i in range(n)]
        self.forget(key)
        gathered = finished_from_choices(key, event.prompt_tokens, choices)
        gathered.cached_tokens = event.cached_tokens  # the samples share one prompt
        return gathered

    def forget(self, key: int) -> None:
        for internal in self._internal.pop(key, []):
            self._sample.pop(internal, None)
        self._choices.pop(key, None)


def row_failed(key: int, message: str) -> Event:
    return Failed(key, P.E_ENGINE, f"structured output failed: {message}", grammar.FIELD)
