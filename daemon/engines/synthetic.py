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

=================  =======  =====================================================
capacity           8        concurrent jobs (the router keeps about this many here)
token_ms           0        milliseconds per step
batch_ms           0        extra milliseconds per step per active job
max_seq_len        4096     context in "tokens" (words): longer prompts are refused
paced              0        keep a clock: a step ends token_ms + batch_ms × active after
                            the previous one, host jitter caught up (see _pace)
eos_from_prompt    0        a prompt containing ``len=N`` ends after N tokens (if fewer
                            than max_new_tokens), as if the model emitted its EOS
boot_s             0        seconds load() takes (slow boot)
fail_load          ""       load() fails with this message (a boot error)
fail_load_slots    ""       ...only in these slots ("1" or "0,2"; $EXGEN_SLOT): the
                            others load, as when one card of a box is broken
crash_after        0        the process dies (os._exit 70) after this many jobs end
crash_marker       ""       a job whose prompt contains this kills the process
hang_marker        ""       a job whose prompt contains this makes step() hang
hang_after         0        step() hangs forever once this many jobs have ended
=================  =======  =====================================================
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from exgen.client import protocol as P
from exgen.daemon.engines.base import (
    Chunk,
    Engine,
    EngineUnavailable,
    Event,
    Finished,
    Job,
    JobRejected,
    take_options,
)

logger = logging.getLogger(__name__)

WORDS = (
    "the quick brown fox jumps over lazy dog river stone light shadow morning evening "
    "garden window letter story ocean mountain silver golden quiet gentle ancient city"
).split()
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
}


# A word per byte value, looked up by C code: the per-byte generator this replaces
# was the larger part of a zero-cost job's CPU (it showed in the router benchmark).
_WORD_OF_BYTE = tuple(WORDS[b % len(WORDS)] for b in range(256))


def synthetic_words(prompt: str, params_seed: int | None, count: int) -> list[str]:
    """``count`` words derived from the prompt (and seed): deterministic everywhere."""
    seed = hashlib.blake2b(f"{params_seed}|{prompt}".encode(), digest_size=16).digest()
    words: list[str] = []
    block = seed
    while len(words) < count:
        block = hashlib.blake2b(block, digest_size=32).digest()
        words.extend(map(_WORD_OF_BYTE.__getitem__, block[: count - len(words)]))
    return words


def prompt_text(job: Job) -> str:
    if job.messages is not None:
        return "\n".join(f"{m['role']}: {m['content']}" for m in job.messages)
    return job.prompt or ""


@dataclass(slots=True)
class _Active:
    job: Job
    words: list[str]
    prompt_tokens: int
    eos: bool = False  # the words end at an EOS, before max_new_tokens
    produced: int = 0
    text: list[str] = field(default_factory=list)


class SyntheticEngine(Engine):
    name = "synthetic"

    def __init__(self, model: str | None, options: dict[str, str]) -> None:
        super().__init__(model, options)
        self.opts = take_options(options, OPTIONS, self.name)
        if self.opts["capacity"] < 1:
            raise EngineUnavailable("synthetic: capacity must be at least 1")
        self._waiting: OrderedDict[int, _Active] = OrderedDict()
        self._active: OrderedDict[int, _Active] = OrderedDict()
        self._ended = 0
        self._hanging = False
        self._step_end = 0.0

    def load(self) -> None:
        if self.opts["boot_s"] > 0:
            time.sleep(self.opts["boot_s"])
        if self.opts["fail_load"] and self._fails_in_this_slot():
            raise EngineUnavailable(f"synthetic unavailable: {self.opts['fail_load']}")

    def _fails_in_this_slot(self) -> bool:
        slots = {s.strip() for s in str(self.opts["fail_load_slots"]).split(",") if s.strip()}
        return not slots or os.environ.get("EXGEN_SLOT", "") in slots

    @property
    def capacity(self) -> int:
        return int(self.opts["capacity"])

    @property
    def max_seq_len(self) -> int:
        return int(self.opts["max_seq_len"])

    @property
    def pending(self) -> int:
        return len(self._waiting) + len(self._active)

    def describe(self) -> dict[str, object]:
        return {"model": "synthetic", "max_seq_len": self.max_seq_len}

    def add(self, job: Job) -> None:
        text = prompt_text(job)
        prompt_tokens = len(text.split())
        if prompt_tokens + job.params.max_new_tokens > self.max_seq_len:
            raise JobRejected(
                P.E_PROMPT_TOO_LONG,
                f"prompt is {prompt_tokens} tokens + max_new_tokens "
                f"{job.params.max_new_tokens} > context {self.max_seq_len}",
            )
        length = job.params.max_new_tokens
        eos = False
        if self.opts["eos_from_prompt"]:
            match = _EOS_AT.search(text)
            eos_at = int(match.group(1)) if match is not None else length
            if eos_at < length:
                length, eos = max(1, eos_at), True
        words = synthetic_words(text, job.params.seed, length)
        self._waiting[job.key] = _Active(job, words, prompt_tokens, eos)

    def cancel(self, key: int) -> None:
        self._waiting.pop(key, None)
        self._active.pop(key, None)

    def step(self) -> list[Event]:
        self._admit()
        self._maybe_fault()
        if not self._active:
            return []
        delay_ms = self.opts["token_ms"] + self.opts["batch_ms"] * len(self._active)
        if delay_ms > 0:
            if self.opts["paced"]:
                self._pace(delay_ms / 1000)
            else:
                time.sleep(delay_ms / 1000)
            return self._advance(1)
        return self._advance(None)

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

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.capacity:
            key, active = self._waiting.popitem(last=False)
            self._active[key] = active

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
        """Each active job gains ``tokens`` words (None: all of them)."""
        events: list[Event] = []
        for key in list(self._active):
            active = self._active[key]
            end = len(active.words) if tokens is None else active.produced + tokens
            new = active.words[active.produced : end]
            active.produced += len(new)
            piece = "".join(" " + w for w in new)
            active.text.append(piece)
            finished = self._finish_if_done(active)
            if finished is not None:
                events.append(finished)
            elif active.job.stream and piece:
                events.append(Chunk(key, piece))
        return events

    def _finish_if_done(self, active: _Active) -> Finished | None:
        stops = active.job.params.stop
        if not stops and active.produced < len(active.words):
            return None  # nothing to look for yet: no joining the whole text every step
        text = "".join(active.text)
        for stop in stops:
            cut = text.find(stop)
            if cut >= 0:
                return self._end(active, text[:cut], P.FINISH_STOP)
        if active.produced >= len(active.words):
            return self._end(active, text, P.FINISH_STOP if active.eos else P.FINISH_LENGTH)
        return None

    def _end(self, active: _Active, text: str, reason: str) -> Finished:
        del self._active[active.job.key]
        self._ended += 1
        crash_after = self.opts["crash_after"]
        if crash_after and self._ended >= crash_after:
            logger.warning("synthetic: %d jobs ended, dying as asked", self._ended)
            os._exit(CRASH_EXIT_CODE)
        return Finished(active.job.key, text, reason, active.prompt_tokens, active.produced)
