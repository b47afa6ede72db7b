"""The synthetic engine: no model, for testing and benchmarking the daemon itself.

It is never a stand-in for a real engine: it generates deterministic words derived
from the prompt (the same prompt and params always give the same text, on any
worker), with a timing model and switches that inject faults.

Timing model: one ``step()`` advances every active job by one token and takes
``token_ms + batch_ms × active_jobs`` milliseconds — a GPU's step time rising with
batch size. With ``token_ms=0`` and ``batch_ms=0`` every job finishes in one step
(a zero-cost engine, for measuring the router). Output length is the job's
``max_new_tokens`` unless a stop string ends it first, or, with ``eos_from_prompt``,
the ``len=N`` written in the prompt: a model's end-of-sequence before the budget,
which the router cannot know in advance (finish_reason "stop").

Engine options (``--engine-opt KEY=VALUE``):

===================  =======  =====================================================
capacity             8        concurrent jobs (the router keeps about this many here)
token_ms             0        milliseconds per step
batch_ms             0        extra milliseconds per step per active job
max_seq_len          4096     context in "tokens" (words): longer prompts are refused
paced                0        keep a clock: a step ends token_ms + batch_ms × active after
                              the previous one, host jitter caught up (see _pace)
eos_from_prompt      0        a prompt containing ``len=N`` ends after N tokens (if fewer
                              than max_new_tokens), as if the model emitted its EOS
boot_s               0        seconds load() takes (slow boot)
fail_load            ""       load() fails with this message (a boot error)
fail_load_slots      ""       ...only in these slots ("1" or "0,2"; $EXGEN_SLOT): the
                              others load, as when one card of a box is broken
crash_after          0        the process dies (os._exit 70) after this many jobs end
crash_marker         ""       a job whose prompt contains this kills the process
hang_marker          ""       a job whose prompt contains this makes step() hang
hang_after           0        step() hangs forever once this many jobs have ended
prefill_token_ms     0        milliseconds per prompt token not found in the prefix
                              cache, spent in the step a job joins the batch
prefix_cache_tokens  0        a prefix cache of this many prompt tokens (words) per
                              worker, LRU; 0: none
prefix_block         16       tokens (words) per cached block
slow_factor          1        step and prefill time × this in the slots of slow_slots
slow_slots           ""       ("3" or "0,2"; $EXGEN_SLOT; empty: none): a slower card
===================  =======  =====================================================

Prefill and the prefix cache, modelled for placement: a prompt's tokens are its words;
its leading whole blocks found in the cache (``prefix.PrefixCache``, keyed as the
transformers engine keys token ids) cost nothing, the rest ``prefill_token_ms``
each. A job's blocks are cached as it joins the batch, so a job admitted later, in
the same step or after, finds them. ``Finished.cached_tokens`` says how many
tokens a job found; ``counters()`` totals hits and tokens saved.

What batch users ask of a generation, modelled cheaply: ``json_schema`` gives a JSON
instance of the schema (:mod:`synthetic_json`; a schema it cannot instantiate is a
per-item error, as a real engine's compile error), written a few characters per
token and ended as by an EOS; ``logprobs`` gives made-up but well-formed values (the
chosen token first among its alternatives, all <= 0); ``n`` samples differ from each
other (sample 0 is the n = 1 text); presence and frequency penalties are accepted and
change nothing. vLLM's ``ignore_eos`` and ``min_tokens`` hold back the ``len=N`` EOS and
stop strings as they do on a model; ``include_stop_str_in_output`` keeps the stop
string; ``skip_special_tokens`` changes nothing: its words are no special tokens.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.engines import grammar
from exgen.daemon.engines.base import (
    Choice,
    Chunk,
    Engine,
    EngineUnavailable,
    Event,
    Finished,
    Job,
    JobRejected,
    PromptEcho,
    SamplingParams,
    TokenLogprob,
    find_stop,
    finished_from_choices,
    take_options,
    text_to_stop,
)
from exgen.daemon.engines.prefix import PrefixCache, PrefixStats
from exgen.daemon.engines.synthetic_json import SchemaUnsupported, instance_text

logger = logging.getLogger(__name__)

WORDS = (
    "the quick brown fox jumps over lazy dog river stone light shadow morning evening "
    "garden window letter story ocean mountain silver golden quiet gentle ancient city"
).split()
_WORD_IDS = {word: i for i, word in enumerate(WORDS)}
CRASH_EXIT_CODE = 70
_EOS_AT = re.compile(r"\blen=(\d{1,7})\b")

OPTIONS: dict[str, tuple[type, object]] = {
    "capacity": (int, 8),
    "token_ms": (float, 0.0),
    "batch_ms": (float, 0.0),
    "max_seq_len": (int, 4096),
    "paced": (bool, False),
    "eos_from_prompt": (bool, False),
    "boot_s": (float, 0.0),
    "fail_load": (str, ""),
    "fail_load_slots": (str, ""),
    "crash_after": (int, 0),
    "crash_marker": (str, ""),
    "hang_marker": (str, ""),
    "hang_after": (int, 0),
    "prefill_token_ms": (float, 0.0),
    "prefix_cache_tokens": (int, 0),
    "prefix_block": (int, 16),
    "slow_factor": (float, 1.0),
    "slow_slots": (str, ""),
}


# A token (a space and a word) per byte value, looked up by C code: the per-byte
# generator this replaces was the larger part of a zero-cost job's CPU (it showed in
# the router benchmark).
_PIECE_OF_BYTE = tuple(" " + WORDS[b % len(WORDS)] for b in range(256))
_piece_of_byte = _PIECE_OF_BYTE.__getitem__
_blake2b = hashlib.blake2b
_BLOCK = 32  # bytes (tokens) per hash block


JSON_CHARS_PER_TOKEN = 4  # structured output: a "token" is this many characters of JSON


def synthetic_tokens(
    prompt: str, params_seed: int | None, count: int, sample: int = 0
) -> list[str]:
    """``count`` tokens (a space and a word each) derived from the prompt (and seed,
    and sample index of n): deterministic everywhere."""
    salt = f"{params_seed}|{prompt}" if sample == 0 else f"{params_seed}|{sample}|{prompt}"
    block = _blake2b(salt.encode(), digest_size=16).digest()
    if count <= _BLOCK:  # one block: the common case, without the loop
        return list(map(_piece_of_byte, _blake2b(block, digest_size=_BLOCK).digest()[:count]))
    out: list[str] = []
    while len(out) < count:
        block = _blake2b(block, digest_size=_BLOCK).digest()
        out.extend(map(_piece_of_byte, block[: count - len(out)]))
    return out


def prompt_echo(job: Job) -> PromptEcho:
    """The prompt as this engine tokenizes it (a word a token: its place among WORDS,
    another word a stable hash), with made-up but well-formed logprobs where asked."""
    text = prompt_text(job)
    if isinstance(job.prompt, list):
        ids = list(job.prompt)
    else:
        ids = [_WORD_IDS.get(w, zlib.crc32(w.encode()) % len(WORDS)) for w in text.split()]
    top = job.params.prompt_logprobs
    if top is None:
        return PromptEcho(ids, text)
    words = [WORDS[t % len(WORDS)] for t in ids]
    entries: list[list[Any]] = [[ids[0], words[0], None, None, []]] if ids else []
    for i in range(1, len(ids)):
        chosen = -0.1 * (1 + i % 5)
        alternatives = [[ids[i], words[i], chosen]]
        alternatives += [[j, WORDS[j], chosen - j - 1] for j in range(top - 1)]
        entries.append([ids[i], words[i], chosen, 1, alternatives[:top]])
    return PromptEcho(ids, text, entries)


def prompt_text(job: Job) -> str:
    if job.messages is not None:
        return "\n".join(f"{m['role']}: {m['content']}" for m in job.messages)
    if isinstance(job.prompt, list):  # token ids: word i of the vocabulary, one a token
        return " ".join(WORDS[token % len(WORDS)] for token in job.prompt)
    return job.prompt or ""


def fake_logprobs(pieces: list[str], top: int) -> list[TokenLogprob]:
    """Well-formed logprobs for these tokens: each chosen first among ``top``
    alternatives (itself, then words), every value <= 0, decreasing."""
    out: list[TokenLogprob] = []
    for i, piece in enumerate(pieces):
        chosen = -0.05 * (1 + i % 7)
        alternatives = [[piece, chosen]]
        alternatives += [[" " + WORDS[(i + j) % len(WORDS)], chosen - j] for j in range(1, top)]
        out.append([piece, chosen, alternatives[:top]])
    return out


@dataclass(slots=True)
class _Sample:
    """One of a job's n samples: its tokens ("pieces" of text) and how far it got."""

    pieces: list[str]
    eos: bool = False  # the pieces end at an EOS, before max_new_tokens
    produced: int = 0
    text: list[str] = field(default_factory=list)
    done: Choice | None = None


@dataclass(slots=True)
class _Active:
    job: Job
    samples: list[_Sample]
    prompt_tokens: int
    cached_tokens: int = 0

    @property
    def produced(self) -> int:
        return self.samples[0].produced


class SyntheticEngine(Engine):
    name = "synthetic"

    def __init__(self, model: str | None, options: dict[str, str]) -> None:
        super().__init__(model, options)
        self.opts = take_options(options, OPTIONS, self.name)
        if self.opts["capacity"] < 1:
            raise EngineUnavailable("synthetic: capacity must be at least 1")
        self._capacity = int(self.opts["capacity"])  # read per job: not from opts each time
        self._max_seq_len = int(self.opts["max_seq_len"])
        self._waiting: OrderedDict[int, _Active] = OrderedDict()
        self._active: OrderedDict[int, _Active] = OrderedDict()
        self._ended = 0
        self._hanging = False
        self._step_end = 0.0
        self._prefill_ms = float(self.opts["prefill_token_ms"])
        self._speed = 1.0  # step time × this (slow_factor, in a slow slot)
        if self.opts["slow_slots"] and self._in_slots(self.opts["slow_slots"]):
            self._speed = float(self.opts["slow_factor"])
        self._prefixes: PrefixCache[None] | None = None
        if self.opts["prefix_cache_tokens"] > 0:
            if self.opts["prefix_block"] < 1:
                raise EngineUnavailable("synthetic: prefix_block must be at least 1")
            self._prefixes = PrefixCache(
                self.opts["prefix_block"], self.opts["prefix_cache_tokens"]
            )
        self._stats = self._prefixes.stats if self._prefixes is not None else PrefixStats()
        self._models_prefill = self._prefill_ms > 0 or self._prefixes is not None

    def load(self) -> None:
        if self.opts["boot_s"] > 0:
            time.sleep(self.opts["boot_s"])
        if self.opts["fail_load"] and self._in_slots(self.opts["fail_load_slots"]):
            raise EngineUnavailable(f"synthetic unavailable: {self.opts['fail_load']}")

    @staticmethod
    def _in_slots(listed: str) -> bool:
        """Whether this process's slot ($EXGEN_SLOT) is listed ("1", "0,2"; empty: all)."""
        slots = {s.strip() for s in str(listed).split(",") if s.strip()}
        return not slots or os.environ.get("EXGEN_SLOT", "") in slots

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def pending(self) -> int:
        return len(self._waiting) + len(self._active)

    def describe(self) -> dict[str, object]:
        tokenizer = {
            "tokenizer_class": "SyntheticWords",  # a word a token (prompt_echo)
            "eos_token": None,
            "chat_template": None,
            "model_max_length": self.max_seq_len,
            "vocab_size": len(WORDS),
        }
        return {"model": "synthetic", "max_seq_len": self.max_seq_len, "tokenizer": tokenizer}

    def counters(self) -> dict[str, int]:
        return self._stats.to_dict() if self._models_prefill else {}

    def add(self, job: Job) -> None:
        text = prompt_text(job)
        prompt_tokens = len(text.split())
        if prompt_tokens + job.params.max_new_tokens > self._max_seq_len:
            raise JobRejected(
                P.E_PROMPT_TOO_LONG,
                f"prompt is {prompt_tokens} tokens + max_new_tokens "
                f"{job.params.max_new_tokens} > context {self._max_seq_len}",
            )
        n = job.params.n
        samples = [self._sample(job, text, 0)] if n == 1 else [
            self._sample(job, text, i) for i in range(n)
        ]  # fmt: skip
        self._waiting[job.key] = _Active(job, samples, prompt_tokens)

    def _sample(self, job: Job, text: str, index: int) -> _Sample:
        params = job.params
        length = params.max_new_tokens
        if params.json_schema is not None:
            pieces = json_pieces(params, text, index)
            return _Sample(pieces[:length], eos=len(pieces) <= length)
        eos = False
        if self.opts["eos_from_prompt"] and not params.ignore_eos:
            match = _EOS_AT.search(text)
            eos_at = int(match.group(1)) if match is not None else length
            eos_at = max(eos_at, params.min_tokens)  # no EOS before min_tokens
            if eos_at < length:
                length, eos = max(1, eos_at), True
        return _Sample(synthetic_tokens(text, params.seed, length, index), eos)

    def cancel(self, key: int) -> None:
        self._waiting.pop(key, None)
        self._active.pop(key, None)

    def step(self) -> list[Event]:
        admitted = self._admit()
        self._maybe_fault()
        if not self._active:
            return []
        decode_ms = self.opts["token_ms"] + self.opts["batch_ms"] * len(self._active)
        delay_ms = decode_ms
        if admitted:
            delay_ms += self._prefill_ms * self._prefill(admitted)
        delay_ms *= self._speed
        if delay_ms > 0:
            if self.opts["paced"]:
                self._pace(delay_ms / 1000)
            else:
                time.sleep(delay_ms / 1000)
        return self._advance(1 if decode_ms > 0 else None)

    def _prefill(self, admitted: list[_Active]) -> int:
        """Prompt tokens these newly admitted jobs must prefill (the rest is cached);
        their blocks are cached for the jobs after them."""
        total = 0
        cache = self._prefixes
        for active in admitted:
            tokens = prompt_text(active.job).split()
            if cache is not None:
                active.cached_tokens = len(cache.match(tokens)) * cache.block
                cache.insert(tokens, _no_value)
            uncached = len(tokens) - active.cached_tokens
            self._stats.tokens_saved += active.cached_tokens
            self._stats.tokens_prefilled += uncached
            total += uncached
        return total

    def _pace(self, seconds: float) -> None:
        """End this step ``seconds`` after the previous one ended, as a GPU's would.

        On a loaded host, sleeps overshoot and the worker's own Python takes time;
        a GPU's step time does not grow with that. Up to one step of such lag is
        caught up on the next step instead of adding up; more (the engine sat idle)
        restarts the clock, so idle time is never banked.
        """
        now = time.monotonic()
        if now - self._step_end > seconds:
            self._step_end = now
        self._step_end += seconds
        time.sleep(max(0.0, self._step_end - now))

    def _admit(self) -> list[_Active]:
        """Waiting jobs into the batch; those admitted now, where prefill is modelled."""
        waiting, running, capacity = self._waiting, self._active, self._capacity
        admitted: list[_Active] = []
        while waiting and len(running) < capacity:
            key, active = waiting.popitem(last=False)
            running[key] = active
            if self._models_prefill:
                admitted.append(active)
        return admitted

    def _maybe_fault(self) -> None:
        marker = self.opts["crash_marker"]
        if marker and any(marker in prompt_text(a.job) for a in self._active.values()):
            logger.warning("synthetic: crash marker seen, dying as asked")
            os._exit(CRASH_EXIT_CODE)
        hang = self.opts["hang_marker"]
        hang_after = self.opts["hang_after"]
        if (hang and any(hang in prompt_text(a.job) for a in self._active.values())) or (
            hang_after and self._ended >= hang_after
        ):
            if not self._hanging:
                logger.warning("synthetic: hanging as asked")
            self._hanging = True
            while True:  # a wedged step: the heartbeat thread lives on
                time.sleep(3600)

    def _advance(self, tokens: int | None) -> list[Event]:
        """Each active job's samples gain ``tokens`` tokens (None: all of them)."""
        events: list[Event] = []
        for key, active in list(self._active.items()):
            params = active.job.params
            samples = active.samples
            stream = ""  # n > 1 streams the first sample
            if len(samples) == 1:  # the common case, without the loop's bookkeeping (a
                # zero-cost job's step: measured 1.10x the workers' CPU without it)
                plain = self._plain_end(active, samples[0], params, tokens)
                if plain is not None:
                    events.append(plain)
                    continue
                stream = self._grow(samples[0], params, tokens)
                ended = samples[0].done is not None
            else:
                for index, sample in enumerate(samples):
                    if sample.done is None:
                        piece = self._grow(sample, params, tokens)
                        stream = piece if index == 0 else stream
                ended = all(s.done is not None for s in samples)
            if ended:
                events.append(self._end(active))
            elif active.job.stream and stream:
                events.append(Chunk(key, stream, samples[0].produced, active.prompt_tokens))
        return events

    def _plain_end(
        self, active: _Active, sample: _Sample, params: SamplingParams, tokens: int | None
    ) -> Finished | None:
        """The Finished of a one-sample job that ends in this step with nothing to look
        for (no stop strings, no logprobs); None for any other (``_grow`` then does
        it): the same event as _grow, _choice and _end make, without their calls (a
        zero-cost job is mostly this)."""
        pieces = sample.pieces
        if (tokens is not None and sample.produced + tokens < len(pieces)) or params.stop:
            return None
        if params.logprobs or params.top_logprobs > 0:
            return None
        last = "".join(pieces[sample.produced :])
        text = "".join([*sample.text, last]) if sample.text else last
        reason = P.FINISH_STOP if sample.eos else P.FINISH_LENGTH
        self._retire(active.job.key)
        finished = Finished(active.job.key, text, reason, active.prompt_tokens, len(pieces))
        finished.cached_tokens = active.cached_tokens
        if params.wants_prompt:
            finished.prompt = prompt_echo(active.job)
        return finished

    def _grow(self, sample: _Sample, params: SamplingParams, tokens: int | None) -> str:
        """The sample's next ``tokens`` tokens (None: all); ends it when it is done."""
        end = len(sample.pieces) if tokens is None else sample.produced + tokens
        piece = "".join(sample.pieces[sample.produced : end])
        sample.produced = min(end, len(sample.pieces))
        sample.text.append(piece)
        sample.done = self._choice_if_done(sample, params)
        return piece if sample.done is None else ""

    def _choice_if_done(self, sample: _Sample, params: SamplingParams) -> Choice | None:
        stops = params.stop
        if not stops and sample.produced < len(sample.pieces):
            return None  # nothing to look for yet: no joining the whole text every step
        text = "".join(sample.text)
        if stops:
            # One piece is one token: the first min_tokens - 1 cannot end the text.
            floor = len("".join(sample.pieces[: max(0, params.min_tokens - 1)]))
            found = find_stop(text, stops, floor)
            if found is not None:
                return self._choice(
                    sample, params, text_to_stop(text, found, params), P.FINISH_STOP
                )
        if sample.produced >= len(sample.pieces):
            reason = P.FINISH_STOP if sample.eos else P.FINISH_LENGTH
            return self._choice(sample, params, text, reason)
        return None

    @staticmethod
    def _choice(sample: _Sample, params: SamplingParams, text: str, reason: str) -> Choice:
        logprobs = None
        if params.wants_logprobs:
            logprobs = fake_logprobs(sample.pieces[: sample.produced], params.top_logprobs)
        return Choice(text, reason, sample.produced, logprobs)

    def _end(self, active: _Active) -> Finished:
        self._retire(active.job.key)
        choices = [s.done for s in active.samples if s.done is not None]
        finished = finished_from_choices(active.job.key, active.prompt_tokens, choices)
        finished.cached_tokens = active.cached_tokens
        if active.job.params.wants_prompt:
            finished.prompt = prompt_echo(active.job)
        return finished

    def _retire(self, key: int) -> None:
        """A job ended: out of the batch, counted (``crash_after``)."""
        del self._active[key]
        self._ended += 1
        crash_after = self.opts["crash_after"]
        if crash_after and self._ended >= crash_after:
            logger.warning("synthetic: %d jobs ended, dying as asked", self._ended)
            os._exit(CRASH_EXIT_CODE)


def _no_value(index: int) -> None:
    """A simulated block holds nothing."""


def json_pieces(params: SamplingParams, prompt: str, index: int) -> list[str]:
    """A JSON instance of the job's schema, cut into tokens; a schema the generator
    cannot instantiate is the job's error, as a compile error is on a real engine."""
    assert params.json_schema is not None
    rng = random.Random(f"{params.seed}|{index}|{prompt}")
    try:
        text = instance_text(params.json_schema, rng)
    except SchemaUnsupported as exc:
        raise JobRejected(
            P.E_BAD_REQUEST,
            f"{grammar.FIELD}: the synthetic engine cannot follow this schema: {exc}",
            grammar.FIELD,
        ) from None
    step = JSON_CHARS_PER_TOKEN
    return [text[i : i + step] for i in range(0, len(text), step)]
