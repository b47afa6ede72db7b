"""The Hugging Face ``transformers`` engine: the CPU default and the seeds' GPU path.

Batches decoded a step at a time (``hf_decode.DecodeBatch``): a batch starts from
up to ``batch_size`` waiting jobs whose sampling parameters allow them to share one
forward pass, left-padded; each ``step()`` is one forward pass of it. Consequences:

- Streaming is real: a streaming job gets a Chunk per step (text held back only
  while it could still be the start of a stop string or a partial character).
- A finished job's result is sent the step it finishes; ``cancel()`` stops a running
  job at once.
- Jobs that arrive while a batch runs join it at the next step (continuous
  batching, as ExLlama's generators and vLLM do): that step is their prefill alone
  (with the prefix cache), so their first token comes out at once, and the running
  rows wait that one step; then their keys and values sit right-aligned where the
  batch's columns end, and they decode with it. Jobs whose batch key
  differs, or that need per-row features (logprobs, penalties, schemas), wait for
  the batch to end, as do all jobs with ``exact=true``.
- ``decode_steps`` counts forward passes, for a heartbeat to show progress.

transformers' own continuous batching (``generate_batch``) was measured on CPU with
the demo model, 16 prompts x 64 new tokens, greedy, 2 threads: about 52 tokens/s
against about 100 tokens/s for left-padded ``generate``, and it takes sampling
parameters per manager rather than per request: the engine joins rows itself.

dtype ``auto``: bfloat16 on a CPU with native bf16 arithmetic (AVX512_BF16 or AMX,
see ``cpu_layout.native_bf16``), float32 on other CPUs (emulated bf16 is slower),
bf16/fp16 on CUDA. Measured on the demo model (Zen 4, 2 cores): bf16 prefills about
3x and decodes about 1.5-2x faster than fp32.

Prefix cache (``hf_prefix``): the keys and values of prompt blocks (16 tokens, keyed
by their whole prefix) are kept across batches within ``prefix_cache_tokens``, least
recently used first out; a prefix that several prompts of a batch share is prefilled
once, and each prompt prefills only what the cache lacks. On CPU a cached prefix is
held once for the rows that start with it (``share_prefix_kv``), not copied into
each. Greedy fp32 output equals
the uncached path's, token for token (tested); in bf16 a row's output can change with
the shape of the products it went through, as it does with the batch it is in.

Determinism: greedy jobs batch together; their output equals a plain single-prompt
``model.generate`` in the same dtype (tested). Jobs with repetition_penalty != 1
only batch with prompts of the same length, because the penalty would otherwise
also hit the pad token (often the EOS token) in the left padding. A sampled job
with a ``seed`` runs alone after ``torch.manual_seed(seed)``, so the same seed
gives the same text whatever else is queued; sampled jobs without a seed batch by
identical parameters and draw from the process's random stream.

Token counts: ``completion_tokens`` counts generated tokens including the EOS
token that ended the job; after a stop string, the tokens up to the one that
completed the stop string.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exgen.client import protocol as P
from exgen.daemon import modelstore
from exgen.daemon.cpu_layout import available_memory_bytes, cpu_flags, native_bf16
from exgen.daemon.engines import grammar, hf_kernels, hf_prefix
from exgen.daemon.engines.base import (
    Engine,
    EngineOptionError,
    EngineUnavailable,
    Event,
    Failed,
    Finished,
    Job,
    JobRejected,
    PromptEcho,
    take_options,
    vocabulary_problem,
)
from exgen.daemon.engines.grammar import Grammars
from exgen.daemon.engines.hf_decode import DecodeBatch, Model, Row, decode, logits_processors
from exgen.daemon.engines.hf_features import BatchFeatures, JobSamples, RowExtras
from exgen.daemon.engines.hf_prefix import PrefixKV
from exgen.daemon.engines.logprobs import prompt_logprob_entries

logger = logging.getLogger(__name__)

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("static",)
# CPU tokens/s grows with the batch (demo model, 2 cores, 100 new tokens, fp32 with
# generate(), measured back to back: 12.5 at 1, 100-126 at 16, 151 at 40, 178 at 80): a
# step streams every weight from memory once, whatever the batch. The KV budget below
# keeps a large model from running the host out of memory with it. 128, not 64: through
# the daemon (2 workers x 1 thread, bf16, Xeon with AMX) 1.31x the tokens/s on 512 of the
# seeds' prompts x 64 tokens and 1.18x the prompts/s on the shared-prefix job, side by
# side (bench/RESULTS.md); vLLM's CPU build batches up to 256 sequences offline.
DEFAULT_BATCH_CPU = 128
DEFAULT_BATCH_GPU = 32
# On CPU a batch's KV cache may take at most this share of the memory available at
# load (the OOM killer, not an exception, is what a CPU batch too large meets).
CPU_KV_MEMORY_SHARE = 0.2
# Waiting rows join a running batch once it has room for an eighth of the batch (or for
# all that wait): each join copies the running cache (hf_decode._append_rows), and a
# full batch whose rows end one by one joined one row at a time (6 joins of 1-12 rows
# in a 96-prompt shared-prefix run). A batch with room to spare takes a row at once.
JOIN_GROUP_DIVISOR = 8

OPTIONS: dict[str, tuple[type, Any]] = {
    "batch_size": (int, 0),  # 0: DEFAULT_BATCH_CPU or DEFAULT_BATCH_GPU
    "dtype": (str, "auto"),  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    "device_map": (str, "auto"),  # used when the slot sees several GPUs
    "threads": (int, 0),  # torch.set_num_threads; 0 leaves torch's default
    "mode": (str, "static"),
    # Convert a GGUF once to safetensors in the cache: later loads take seconds, not
    # the half minute GGUF parsing and tokenizer conversion cost every time.
    "gguf_cache": (bool, True),
    # The prefix cache (hf_prefix): tokens of KV kept across batches for prompt blocks;
    # -1: a tenth of the memory available at load (CPU: host, CUDA: the card's free
    # memory), 0: no cache. prefix_block: tokens per cached block.
    "prefix_cache_tokens": (int, -1),
    "prefix_block": (int, hf_prefix.DEFAULT_BLOCK),
    # exact: the model's stock kernels and batches that only start whole, so greedy
    # output is plain transformers' bit for bit (docs/quality.md); otherwise the
    # engine's own faster path, held to the field's bar instead (top-5, logprobs).
    "exact": (bool, False),
    # Without exact: linear layers' weights prepacked for oneDNN at load (hf_kernels).
    "prepack": (bool, True),
    # Without exact: a query much shorter than its keys (a suffix over a cached
    # prefix) runs SDPA with grouped-query heads folded, not keys copied per head
    # (hf_kernels.folded_gqa_forward; equal output).
    "fold_gqa": (bool, True),
    # Without exact: the engine's decode attention (hf_kernels). Off: measured 0.92x
    # the stock SDPA kernel's tokens/s (bf16, 32 rows, one thread).
    "decode_attention": (bool, False),
    # Without exact, on CPU: rows that start with a cached prefix keep only their own
    # columns, and attend to the prefix's keys and values stored once, shared by them
    # (hf_kernels.shared_prefix_forward), where off copies the prefix into every row.
    "share_prefix_kv": (bool, True),
}


@dataclass(slots=True)
class _Waiting:
    job: Job
    input_ids: list[int]


@dataclass(slots=True)
class _Loaded:
    """What load() produced; kept together so a half-loaded engine never exists."""

    torch: Any
    model: Any
    tokenizer: Any
    name: str
    device: str
    dtype: str
    devices: list[str]
    max_seq_len: int | None
    eos_ids: frozenset[int]
    pad_id: int
    kv_bytes_per_token: int | None  # None: the config does not say


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model: str | None, options: dict[str, str]) -> None:
        super().__init__(model, options)
        self._opts = _check_options(take_options(options, OPTIONS, self.name))
        self._state: _Loaded | None = None
        self._waiting: list[_Waiting] = []
        self._batch: DecodeBatch | None = None
        self._batch_rows: list[_Waiting] = []  # what _batch was made of (for an OOM retry)
        self._batch_key: tuple[Any, ...] | None = None  # jobs of this key may join _batch
        self._batch_limit = 0
        self._kv_token_budget: int | None = None  # tokens a batch may hold (CPU)
        self._samples = JobSamples()  # n > 1: a job's rows and their gathering
        self._prompt_only: list[_Waiting] = []  # max_new_tokens 0: the prompt is the job
        self._echoes: dict[int, _Waiting] = {}  # generating jobs that want their prompt back
        self._grammars: Grammars | None = None  # built on the first JSON Schema job
        self._pieces: dict[int, str] = {}  # token id -> its text, for logprobs
        self._prefixes: PrefixKV | None = None  # the prefix cache, made at load
        self._packed = 0  # linear layers prepacked at load (hf_kernels)
        self._share_prefix_kv = False  # batches keep a cached prefix once (hf_kernels)
        self.load_s = 0.0
        self.decode_steps = 0  # advanced during generate(), read by a heartbeat

    # --- lifecycle ------------------------------------------------------------------

    def load(self) -> None:
        started = time.monotonic()
        torch, transformers = _import_libraries()
        path = _resolve(self.model)
        if self._opts["threads"] > 0:
            torch.set_num_threads(self._opts["threads"])
        device, device_map = _placement(torch, self._opts["device_map"])
        dtype = _pick_dtype(torch, self._opts["dtype"], device)
        source = path
        if self._opts["gguf_cache"]:
            source = _cached_conversion(transformers, path, dtype)
        tokenizer, model = _load_pretrained(transformers, source, dtype, device, device_map)
        self._state = _describe_loaded(torch, model, tokenizer, path, device, dtype)
        self._packed = 0
        if device == "cpu" and not self._opts["exact"] and self._opts["prepack"]:
            self._packed = hf_kernels.prepack_linears(torch, model, dtype)
        self._share_prefix_kv = False
        if device == "cpu" and not self._opts["exact"]:
            share = self._opts["share_prefix_kv"] and hf_kernels.layers_indexed(model)
            name = hf_kernels.use_attention(
                torch, model, self._opts["fold_gqa"], self._opts["decode_attention"], share
            )
            self._share_prefix_kv = share and name is not None
        default_batch = DEFAULT_BATCH_CPU if device == "cpu" else DEFAULT_BATCH_GPU
        self._batch_limit = self._opts["batch_size"] or default_batch
        if device == "cpu":
            self._kv_token_budget = kv_token_budget(
                self._state.kv_bytes_per_token, available_memory_bytes()
            )
        self._prefixes = self._make_prefix_cache(torch, device)
        self.load_s = time.monotonic() - started
        logger.info(
            "loaded %s on %s (%s, max_seq_len %s, batch %d, KV budget %s tokens, "
            "prefix cache %s tokens) in %.1fs",
            self._state.name,
            ",".join(self._state.devices),
            self._state.dtype,
            self._state.max_seq_len,
            self._batch_limit,
            self._kv_token_budget or "-",
            self._prefixes.blocks.capacity_tokens if self._prefixes else "-",
            self.load_s,
        )

    def close(self) -> None:
        self._waiting.clear()
        self._batch = None
        self._state = None
        if self._prefixes is not None:
            self._prefixes.clear()

    def _make_prefix_cache(self, torch: Any, device: str) -> PrefixKV | None:
        state = self._loaded()
        tokens = self._opts["prefix_cache_tokens"]
        if tokens < 0:
            available = available_memory_bytes()
            if device != "cpu":
                available = int(torch.cuda.mem_get_info()[0])
            tokens = hf_prefix.default_capacity_tokens(state.kv_bytes_per_token, available)
        if tokens < self._opts["prefix_block"]:
            return None
        return PrefixKV(torch, self._opts["prefix_block"], tokens)

    @property
    def capacity(self) -> int:
        return self._batch_limit or self._opts["batch_size"] or DEFAULT_BATCH_CPU

    @property
    def max_seq_len(self) -> int | None:
        return self._state.max_seq_len if self._state else None

    @property
    def pending(self) -> int:
        running = 0
        if self._batch is not None:
            running = len({self._samples.job_key(k) for k in self._batch.active_keys()})
        return len(self._waiting) + len(self._prompt_only) + running

    def describe(self) -> dict[str, Any]:
        state = self._loaded()
        return {
            "engine": self.name,
            "model": state.name,
            "dtype": state.dtype,
            "devices": state.devices,
            "max_seq_len": state.max_seq_len,
            "mode": self._opts["mode"],
            "exact": self._opts["exact"],
            "prepacked_linears": self._packed,
            "batch_size": self._batch_limit,
            "prefix_cache_tokens": self._prefixes.blocks.capacity_tokens if self._prefixes else 0,
            "shared_prefix_kv": self._share_prefix_kv,
            "load_s": round(self.load_s, 2),
            "tokenizer": tokenizer_info(state.tokenizer, state.max_seq_len),
        }

    def counters(self) -> dict[str, int]:
        return self._prefixes.stats.to_dict() if self._prefixes else {}

    # --- jobs -----------------------------------------------------------------------

    def add(self, job: Job) -> None:
        input_ids = self._encode(job)
        limit = self._loaded().max_seq_len
        wanted = len(input_ids) + job.params.max_new_tokens
        if limit is not None and wanted > limit:
            raise JobRejected(
                P.E_PROMPT_TOO_LONG,
                f"prompt is {len(input_ids)} tokens + max_new_tokens "
                f"{job.params.max_new_tokens} > context {limit}",
            )
        if job.params.json_schema is not None:
            self._grammar().compile(job.params.json_schema)  # a bad schema fails this job now
        waiting = _Waiting(job, input_ids)
        if job.params.max_new_tokens == 0:
            self._prompt_only.append(waiting)
            return
        if job.params.wants_prompt:
            self._echoes[job.key] = waiting
        self._waiting.append(waiting)

    def cancel(self, key: int) -> None:
        # A running row stops at once; the batch goes on without it.
        running = False
        if self._batch is not None:
            for row_key in self._samples.keys_of(key):
                running = self._batch.cancel(row_key) or running
        self._samples.forget(key)
        self._echoes.pop(key, None)
        self._prompt_only = [w for w in self._prompt_only if w.job.key != key]
        if running:
            if self._batch is not None and self._batch.finished:
                self._batch = None
                self._batch_rows = []
            return
        self._waiting = [w for w in self._waiting if w.job.key != key]

    def step(self) -> list[Event]:
        """One forward pass of the running batch (starting one from the waiting jobs), or
        of one job that only reads its prompt."""
        if self._prompt_only:
            return [self._read_prompt(self._prompt_only.pop(0))]
        joining = None
        if self._batch is None:
            batch = self._take_batch()
            if not batch:
                return []
            self._start_batch(batch)
        elif not self._opts["exact"] and self._batch.joinable:
            joining = self._joining_batch(self._batch)
        return self._advance_batch(joining)

    # --- internals --------------------------------------------------------------------

    def _loaded(self) -> _Loaded:
        if self._state is None:
            raise RuntimeError("TransformersEngine used before load()")
        return self._state

    def _encode(self, job: Job) -> list[int]:
        if isinstance(job.prompt, list):  # the model's token ids, as a client's tokenizer gave them
            model = self._loaded().model
            problem = vocabulary_problem(job.prompt, model.get_input_embeddings().num_embeddings)
            if problem is not None:
                raise problem
            return list(job.prompt)
        tokenizer = self._loaded().tokenizer
        if job.messages is not None:
            try:
                text = tokenizer.apply_chat_template(
                    job.messages, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # jinja and transformers raise assorted types
                raise JobRejected(
                    P.E_BAD_REQUEST, f"chat template failed: {_one_line(exc)}"
                ) from None
            # The rendered template carries its own special tokens (as in HF's own path).
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            special = job.params.add_special_tokens
            ids = tokenizer(job.prompt or "", add_special_tokens=special)["input_ids"]
        if not ids:
            raise JobRejected(P.E_BAD_REQUEST, "prompt is empty (0 tokens)")
        return list(ids)

    def _take_batch(self) -> list[_Waiting]:
        """The oldest waiting job and, in arrival order, the others that can share its call.

        At most ``batch_size`` jobs, and on CPU at most the KV token budget: every
        row of a left-padded batch holds the widest prompt plus the largest budget.
        """
        if not self._waiting:
            return []
        key = _batch_key(self._waiting[0])
        batch: list[_Waiting] = []
        rest: list[_Waiting] = []
        width = longest = 0
        rows = 0  # a job of n samples is n rows
        for waiting in self._waiting:
            n = waiting.job.params.n
            fits = (not batch or rows + n <= self._batch_limit) and _batch_key(waiting) == key
            if fits and batch and self._kv_token_budget is not None:
                row = max(width, len(waiting.input_ids)) + max(
                    longest, waiting.job.params.max_new_tokens
                )
                fits = row * (rows + n) <= self._kv_token_budget
            if fits:
                rows += n
                batch.append(waiting)
                width = max(width, len(waiting.input_ids))
                longest = max(longest, waiting.job.params.max_new_tokens)
            else:
                rest.append(waiting)
        self._waiting = rest
        return batch

    def _joining_batch(self, running: DecodeBatch) -> DecodeBatch | None:
        """Waiting jobs that can join the running batch at this step (continuous
        batching): its batch key, no per-row features, room in ``batch_size`` and in
        the KV budget. None when there are none."""
        room = self._batch_limit - len(running.active_keys())
        if room <= 0 or not self._waiting or self._batch_key is None:
            return None
        if room < min(len(self._waiting), max(1, self._batch_limit // JOIN_GROUP_DIVISOR)):
            return None  # a full batch takes rows in groups, not one as each row ends
        columns = running.mask.shape[1]
        taken: list[_Waiting] = []
        rest: list[_Waiting] = []
        for waiting in self._waiting:
            n = waiting.job.params.n
            fits = n <= room and _batch_key(waiting) == self._batch_key
            fits = fits and not _needs_features(waiting.job.params)
            if fits and self._kv_token_budget is not None:
                wide = columns + len(waiting.input_ids) + waiting.job.params.max_new_tokens
                fits = wide * (len(running.rows) + n) <= self._kv_token_budget
            if fits:
                room -= n
                taken.append(waiting)
            else:
                rest.append(waiting)
        if not taken:
            return None
        self._waiting = rest
        self._batch_rows += taken
        rows = [row for w in taken for row in self._rows_of(w)]
        model = self._batch_model()
        return DecodeBatch(model, rows, running.processors, running.greedy, None, self._prefixes)

    def _start_batch(self, batch: list[_Waiting]) -> None:
        state = self._loaded()
        params = batch[0].job.params
        if params.seed is not None and not params.greedy:
            state.torch.manual_seed(params.seed)  # such a job runs alone: see _batch_key
        rows = [row for w in batch for row in self._rows_of(w)]
        model = self._batch_model()
        features = None
        if (
            params.presence_penalty
            or params.frequency_penalty
            or any(r.extras.matcher is not None or r.extras.top_logprobs is not None for r in rows)
        ):
            features = BatchFeatures(state.torch, params, self._piece)
        processors = logits_processors(params)
        self._batch = DecodeBatch(model, rows, processors, params.greedy, features, self._prefixes)
        self._batch_rows = batch
        self._batch_key = _batch_key(batch[0])

    def _batch_model(self) -> Model:
        state = self._loaded()
        return Model(
            state.torch, state.model, state.tokenizer, state.eos_ids, state.pad_id,
            self._share_prefix_kv,
        )  # fmt: skip

    def _rows_of(self, waiting: _Waiting) -> list[Row]:
        """A job's rows: one per sample (n), each with its matcher and logprobs."""
        rows = []
        for job, index in self._samples.rows_of(waiting.job):
            params = job.params
            extras = RowExtras(index, top_logprobs=params.top_logprobs)
            if not params.wants_logprobs:
                extras.top_logprobs = None
            if params.json_schema is not None:
                extras.matcher = self._grammar().matcher(params.json_schema)
            rows.append(Row(job, waiting.input_ids, extras=extras))
        return rows

    def _grammar(self) -> Grammars:
        if self._grammars is None:
            state = self._loaded()
            backend = getattr(state.tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise JobRejected(
                    P.E_BAD_REQUEST,
                    "structured output needs a fast (tokenizers) tokenizer; this model has none",
                    grammar.FIELD,
                )
            width = int(state.model.get_output_embeddings().weight.shape[0])
            self._grammars = Grammars.from_tokenizer_json(
                backend.to_str(), sorted(state.eos_ids), width
            )
        return self._grammars

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = str(self._loaded().tokenizer.decode([token]))
        return piece

    def _advance_batch(self, joining: DecodeBatch | None = None) -> list[Event]:
        batch = self._batch
        assert batch is not None
        try:
            events = batch.step(joining)
        except self._loaded().torch.OutOfMemoryError:
            self._batch = None
            keys = batch.active_keys() + (joining.active_keys() if joining else [])
            active = {self._samples.job_key(k) for k in keys}
            return self._after_oom([w for w in self._batch_rows if w.job.key in active])
        self.decode_steps += 1
        events, siblings = self._samples.translate(events)
        for key in siblings:  # the other samples of a job that failed
            batch.cancel(key)
        events = [self._with_prompt(e) for e in events]
        if batch.finished:
            self._batch = None
            self._batch_rows = []
        return events

    def _read_prompt(self, waiting: _Waiting) -> Event:
        """A job of max_new_tokens 0: its prompt back (echo) and its logprobs, no text."""
        job = waiting.job
        try:
            echo = self._echo(waiting)
        except self._loaded().torch.OutOfMemoryError:
            message = f"out of memory reading a prompt of {len(waiting.input_ids)} tokens"
            return Failed(job.key, P.E_ENGINE, message)
        return Finished(job.key, "", P.FINISH_LENGTH, len(waiting.input_ids), 0, prompt=echo)

    def _with_prompt(self, event: Event) -> Event:
        waiting = self._echoes.pop(event.key, None)
        if waiting is not None and isinstance(event, Finished):
            event.prompt = self._echo(waiting)
        return event

    def _echo(self, waiting: _Waiting) -> PromptEcho:
        """The prompt's ids and text; with prompt_logprobs, one forward pass over it."""
        state, params, ids = self._loaded(), waiting.job.params, waiting.input_ids
        text = decode(state.tokenizer, ids, params.skip_special_tokens)
        if params.prompt_logprobs is None:
            return PromptEcho(ids, text)
        torch = state.torch
        with torch.inference_mode():
            tokens = torch.tensor([ids], dtype=torch.long, device=state.model.device)
            logits = state.model(input_ids=tokens).logits[0]
            entries = prompt_logprob_entries(
                torch, logits, ids, params.prompt_logprobs, self._piece
            )
        return PromptEcho(ids, text, entries)

    def _after_oom(self, batch: list[_Waiting]) -> list[Event]:
        torch = self._loaded().torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) > 1:
            # Retry these jobs first, in smaller batches from now on.
            self._batch_limit = max(1, len(batch) // 2)
            self._waiting[:0] = batch
            logger.warning(
                "out of memory with a batch of %d; batch_size now %d", len(batch), self._batch_limit
            )
            return []
        waiting = batch[0]
        self._samples.forget(waiting.job.key)
        return [
            Failed(
                waiting.job.key,
                P.E_ENGINE,
                f"out of memory generating for a prompt of {len(waiting.input_ids)} "
                f"tokens + max_new_tokens {waiting.job.params.max_new_tokens}",
            )
        ]


# --- pure helpers --------------------------------------------------------------------


def _check_options(opts: dict[str, Any]) -> dict[str, Any]:
    for name, allowed in (("dtype", DTYPES), ("device_map", DEVICE_MAPS), ("mode", MODES)):
        if opts[name] not in allowed:
            raise EngineOptionError(
                f"transformers: engine option {name}={opts[name]!r} not one of {', '.join(allowed)}"
            )
    if opts["batch_size"] < 0 or opts["threads"] < 0:
        raise EngineOptionError("transformers: batch_size and threads must be >= 0")
    if opts["prefix_block"] < 1 or opts["prefix_cache_tokens"] < -1:
        raise EngineOptionError(
            "transformers: prefix_block must be >= 1 and prefix_cache_tokens >= -1"
        )
    return opts


def _needs_features(params: Any) -> bool:
    """Per-row work a joined row would not get (see ``DecodeBatch.joinable``)."""
    return bool(
        params.presence_penalty
        or params.frequency_penalty
        or params.json_schema is not None
        or params.wants_logprobs
        or params.repetition_penalty != 1.0
    )


def _batch_key(waiting: _Waiting) -> tuple[Any, ...]:
    """Jobs with equal keys can share one generate() call without changing their output."""
    p = waiting.job.params
    key: tuple[Any, ...]
    if p.greedy:
        key = ("greedy", p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
    elif p.seed is not None:
        key = ("seeded", waiting.job.key)  # alone: the random draws depend on batch shape
    else:
        key = ("sampled", p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty)
        key += (p.presence_penalty, p.frequency_penalty)
    if p.repetition_penalty != 1.0:
        key += (len(waiting.input_ids),)  # no padding for the penalty to see
    return key


def tokenizer_info(tokenizer: Any, max_seq_len: int | None) -> dict[str, Any]:
    """What a client needs to tokenize as this engine does (vLLM's /tokenizer_info)."""
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": max_seq_len,
        "vocab_size": len(tokenizer),
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else exc.__class__.__name__
    return first[:300]


# --- loading -------------------------------------------------------------------------


def _import_libraries() -> tuple[Any, Any]:
    # Offline before the hub library reads its settings at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise EngineUnavailable(
            f"transformers unavailable: {_one_line(exc)} (pip install 'exgen[transformers]')"
        ) from None
    # Progress bars are for terminals; a worker's stderr is the daemon's log (journal).
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def _resolve(spec: str | None) -> Path:
    try:
        return modelstore.resolve_model(spec, modelstore.models_dir())
    except modelstore.ModelNotFound as exc:
        raise EngineUnavailable(f"transformers: {exc}") from None


def _split_gguf(path: Path) -> tuple[Path, str | None]:
    """(directory to load from, gguf file name or None for a safetensors directory)."""
    if path.is_file():
        return path.parent, path.name
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise EngineUnavailable(
            f"transformers: {path} holds several GGUF files ({', '.join(ggufs)}); name one"
        )
    raise EngineUnavailable(f"transformers: {path} has no config.json and no .gguf file")


def _placement(torch: Any, device_map: str) -> tuple[str, Any]:
    """(input device, from_pretrained device_map) for what CUDA_VISIBLE_DEVICES shows."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return "cpu", None
    if count == 1:
        return "cuda:0", {"": 0}
    return "cuda:0", device_map


def _pick_dtype(torch: Any, choice: str, device: str) -> Any:
    if choice != "auto":
        return getattr(torch, choice)
    if device == "cpu":
        return torch.bfloat16 if native_bf16(cpu_flags()) else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _load_pretrained(
    transformers: Any, path: Path, dtype: Any, device: str, device_map: Any
) -> tuple[Any, Any]:
    repo, gguf_file = _split_gguf(path)
    common: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(repo), **common)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(repo), dtype=dtype, device_map=device_map, **common
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise EngineUnavailable(
            f"transformers: cannot load model {path}: {_one_line(exc)}"
        ) from None
    model.eval()
    return tokenizer, model


def _cached_conversion(transformers: Any, path: Path, dtype: Any) -> Path:
    """For a GGUF model: a safetensors copy in the cache, made once (under a lock, as
    several workers start together); for anything else: the path itself."""
    _, gguf_file = _split_gguf(path)
    if gguf_file is None:
        return path
    gguf = path if path.is_file() else path / gguf_file
    target = modelstore.converted_dir(gguf, str(dtype).removeprefix("torch."))
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (target / "config.json").is_file():
            _convert_gguf(transformers, path, dtype, target)
    return target


def _convert_gguf(transformers: Any, path: Path, dtype: Any, target: Path) -> None:
    started = time.monotonic()
    tokenizer, model = _load_pretrained(transformers, path, dtype, "cpu", None)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(partial)
        # The weights are plain tensors by now (dequantised on load), but transformers
        # still calls the model "gguf-quantised" and refuses to save it: say otherwise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        partial.rename(target)  # atomic: readers see all of it or nothing
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("converted %s to %s in %.1fs (once)", path.name, target, time.monotonic() - started)


def _describe_loaded(
    torch: Any, model: Any, tokenizer: Any, path: Path, device: str, dtype: Any
) -> _Loaded:
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    device_map = getattr(model, "hf_device_map", None)
    # accelerate names GPUs by index ("cpu"/"disk" for offloaded layers).
    placed = {f"cuda:{d}" if isinstance(d, int) else str(d) for d in (device_map or {}).values()}
    devices = sorted(placed) if placed else [device]
    return _Loaded(
        torch=torch,
        model=model,
        tokenizer=tokenizer,
        name=_model_name(path),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        devices=devices,
        max_seq_len=_context_length(model.config),
        eos_ids=eos_ids,
        pad_id=int(pad_id),
        kv_bytes_per_token=kv_bytes_per_token(model.config, model.dtype.itemsize),
    )


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int | None:
    """Bytes of KV cache one token takes: keys and values, every layer and KV head."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    hidden = getattr(config, "hidden_size", None)
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = hidden // heads
    sizes = [v for v in (layers, kv_heads, head_dim) if isinstance(v, int) and v > 0]
    if len(sizes) != 3:
        return None
    return 2 * math.prod(sizes) * dtype_bytes


def kv_token_budget(per_token: int | None, available: int | None) -> int | None:
    """Tokens (rows × row length) a CPU batch may hold; None: no limit known."""
    if per_token is None or available is None:
        return None
    return max(1, int(available * CPU_KV_MEMORY_SHARE) // per_token)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every EOS id of generation_config (an int or a list), else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise EngineUnavailable("transformers: the model defines no EOS token")
    return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])


def _context_length(config: Any) -> int | None:
    # GGUF's <arch>.context_length arrives as max_position_embeddings.
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _model_name(path: Path) -> str:
    try:
        if path == modelstore.default_model_path():
            return modelstore.DEFAULT_MODEL_NAME.split(" ")[0]
    except modelstore.ModelNotFound:
        pass
    return path.name
