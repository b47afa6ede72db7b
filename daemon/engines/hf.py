"""The Hugging Face ``transformers`` engine: the CPU default and the seeds' GPU path.

Static batching: each ``step()`` takes up to ``batch_size`` waiting jobs whose
sampling parameters allow them to share one ``model.generate`` call, left-pads
them, runs the call to the end and returns their results. Consequences:

- Streaming is coarse: a streaming job gets one Chunk with its whole text right
  before its Finished event.
- ``cancel()`` drops a waiting job; a job inside a running batch cannot be
  interrupted (``step()`` only returns when its batch is done).
- One ``step()`` lasts as long as the batch's longest job. ``decode_steps``
  counts decoding steps as they happen, for a heartbeat to show progress.

Continuous batching (``generate_batch``) was measured on CPU with the demo model,
16 prompts x 64 new tokens, greedy, 2 threads: about 52 tokens/s against about
100 tokens/s for left-padded ``generate`` (and 12.5 tokens/s one at a time). It
also takes sampling parameters per manager rather than per request, so only the
static mode is kept (option ``mode=static``).

Determinism: greedy jobs batch together; with fp32 on CPU their output equals a
plain single-prompt ``model.generate`` (tested). Jobs with repetition_penalty != 1
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
from typing import TYPE_CHECKING, Any

from exgen.client import protocol as P
from exgen.daemon import modelstore
from exgen.daemon.engines.base import (
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
    take_options,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("static",)
# CPU tokens/s grows with the batch (demo model, 2 cores, 100 new tokens, measured
# back to back: 12.5 at 1, 100-126 at 16, 151 at 40, 178 at 80): a step streams every
# weight from memory once, whatever the batch. The KV budget below keeps a large model
# from running the host out of memory with it.
DEFAULT_BATCH_CPU = 64
DEFAULT_BATCH_GPU = 32
# On CPU a batch's KV cache may take at most this share of the memory available at
# load (the OOM killer, not an exception, is what a CPU batch too large meets).
CPU_KV_MEMORY_SHARE = 0.2

OPTIONS: dict[str, tuple[type, Any]] = {
    "batch_size": (int, 0),  # 0: DEFAULT_BATCH_CPU or DEFAULT_BATCH_GPU
    "dtype": (str, "auto"),  # auto: bfloat16 on CUDA, float32 on CPU
    "device_map": (str, "auto"),  # used when the slot sees several GPUs
    "threads": (int, 0),  # torch.set_num_threads; 0 leaves torch's default
    "mode": (str, "static"),
    # Convert a GGUF once to safetensors in the cache: later loads take seconds, not
    # the half minute GGUF parsing and tokenizer conversion cost every time.
    "gguf_cache": (bool, True),
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
        self._batch_limit = 0
        self._kv_token_budget: int | None = None  # tokens a batch may hold (CPU)
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
        default_batch = DEFAULT_BATCH_CPU if device == "cpu" else DEFAULT_BATCH_GPU
        self._batch_limit = self._opts["batch_size"] or default_batch
        if device == "cpu":
            self._kv_token_budget = kv_token_budget(
                self._state.kv_bytes_per_token, available_memory_bytes()
            )
        self.load_s = time.monotonic() - started
        logger.info(
            "loaded %s on %s (%s, max_seq_len %s, batch %d, KV budget %s tokens) in %.1fs",
            self._state.name,
            ",".join(self._state.devices),
            self._state.dtype,
            self._state.max_seq_len,
            self._batch_limit,
            self._kv_token_budget or "-",
            self.load_s,
        )

    def close(self) -> None:
        self._waiting.clear()
        self._state = None

    @property
    def capacity(self) -> int:
        return self._batch_limit or self._opts["batch_size"] or DEFAULT_BATCH_CPU

    @property
    def max_seq_len(self) -> int | None:
        return self._state.max_seq_len if self._state else None

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def describe(self) -> dict[str, Any]:
        state = self._loaded()
        return {
            "engine": self.name,
            "model": state.name,
            "dtype": state.dtype,
            "devices": state.devices,
            "max_seq_len": state.max_seq_len,
            "mode": self._opts["mode"],
            "batch_size": self._batch_limit,
            "load_s": round(self.load_s, 2),
        }

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
        self._waiting.append(_Waiting(job, input_ids))

    def cancel(self, key: int) -> None:
        # Only waiting jobs can go: a batch in generate() runs to its end.
        self._waiting = [w for w in self._waiting if w.job.key != key]

    def step(self) -> list[Event]:
        batch = self._take_batch()
        if not batch:
            return []
        return self._run_batch(batch)

    # --- internals --------------------------------------------------------------------

    def _loaded(self) -> _Loaded:
        if self._state is None:
            raise RuntimeError("TransformersEngine used before load()")
        return self._state

    def _encode(self, job: Job) -> list[int]:
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
            ids = tokenizer(job.prompt or "")["input_ids"]
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
        for waiting in self._waiting:
            fits = len(batch) < self._batch_limit and _batch_key(waiting) == key
            if fits and batch and self._kv_token_budget is not None:
                row = max(width, len(waiting.input_ids)) + max(
                    longest, waiting.job.params.max_new_tokens
                )
                fits = row * (len(batch) + 1) <= self._kv_token_budget
            if fits:
                batch.append(waiting)
                width = max(width, len(waiting.input_ids))
                longest = max(longest, waiting.job.params.max_new_tokens)
            else:
                rest.append(waiting)
        self._waiting = rest
        return batch

    def _run_batch(self, batch: list[_Waiting]) -> list[Event]:
        state = self._loaded()
        torch = state.torch
        try:
            rows = self._generate(batch)
        except torch.OutOfMemoryError:
            return self._after_oom(batch)
        events: list[Event] = []
        for waiting, generated in zip(batch, rows, strict=True):
            finished = self._finish(waiting, generated)
            if waiting.job.stream and finished.text:
                events.append(Chunk(finished.key, finished.text))
            events.append(finished)
        return events

    def _generate(self, batch: list[_Waiting]) -> list[list[int]]:
        state = self._loaded()
        torch = state.torch
        params = batch[0].job.params
        width = max(len(w.input_ids) for w in batch)
        input_ids, attention_mask = _left_pad(torch, batch, width, state.pad_id, state.model.device)
        longest = max(w.job.params.max_new_tokens for w in batch)
        stopper = _RowStopper(self, batch, width)
        from transformers import StoppingCriteriaList

        if params.seed is not None and not params.greedy:
            torch.manual_seed(params.seed)  # such a job runs alone: see _batch_key
        with torch.inference_mode():
            out = state.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(params, longest),
                stopping_criteria=StoppingCriteriaList([stopper]),
            )
        return [row.tolist() for row in out[:, width:].cpu()]

    def _generation_config(self, params: SamplingParams, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        state = self._loaded()
        # Every knob set explicitly: generate() fills unset ones from the model's
        # generation_config, which may ask for sampling (temperature 0.6, top_k 20...).
        common: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": sorted(state.eos_ids),
            "pad_token_id": state.pad_id,
            "repetition_penalty": params.repetition_penalty,
            "num_beams": 1,
        }
        if params.greedy:
            return GenerationConfig(
                do_sample=False, temperature=1.0, top_p=1.0, top_k=50, min_p=None, **common
            )
        return GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,  # 0 adds no top-k warper
            min_p=params.min_p or None,
            **common,
        )

    def _finish(self, waiting: _Waiting, generated: list[int]) -> Finished:
        state = self._loaded()
        params = waiting.job.params
        tokens = generated[: params.max_new_tokens]  # the batch may have run longer
        reason = P.FINISH_LENGTH
        for i, token in enumerate(tokens):
            if token in state.eos_ids:
                tokens, reason = tokens[: i + 1], P.FINISH_STOP
                break
        text = _decode(state.tokenizer, tokens)
        cut = _first_stop(text, params.stop)
        if cut is not None:
            text, reason = text[:cut], P.FINISH_STOP
            tokens = tokens[: _tokens_to_stop(state.tokenizer, tokens, params.stop)]
        return Finished(waiting.job.key, text, reason, len(waiting.input_ids), len(tokens))

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
        return [
            Failed(
                waiting.job.key,
                P.E_ENGINE,
                f"out of memory generating for a prompt of {len(waiting.input_ids)} "
                f"tokens + max_new_tokens {waiting.job.params.max_new_tokens}",
            )
        ]


class _RowStopper:
    """A stopping criterion per row: its own max_new_tokens and stop strings.

    generate() pads a finished row and goes on until every row is finished, so a
    row that stops early costs nothing but its slot. Also counts decode steps.
    """

    def __init__(self, engine: TransformersEngine, batch: list[_Waiting], width: int) -> None:
        self._engine = engine
        self._tokenizer = engine._loaded().tokenizer
        self._width = width
        self._limits = [w.job.params.max_new_tokens for w in batch]
        self._stops = [w.job.params.stop for w in batch]
        # Enough tail tokens to hold the longest stop string (a token is >= 1 char,
        # bar partial UTF-8 bytes, hence the margin).
        self._tail = max((len(s) for stops in self._stops for s in stops), default=0) + 8

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self._engine.decode_steps += 1
        generated = input_ids.shape[1] - self._width
        done = [generated >= limit for limit in self._limits]
        for row, stops in enumerate(self._stops):
            if stops and not done[row]:
                tail = input_ids[row, max(self._width, input_ids.shape[1] - self._tail) :]
                done[row] = _first_stop(_decode(self._tokenizer, tail.tolist()), stops) is not None
        return input_ids.new_tensor(done).bool()


# --- pure helpers --------------------------------------------------------------------


def _check_options(opts: dict[str, Any]) -> dict[str, Any]:
    for name, allowed in (("dtype", DTYPES), ("device_map", DEVICE_MAPS), ("mode", MODES)):
        if opts[name] not in allowed:
            raise EngineOptionError(
                f"transformers: engine option {name}={opts[name]!r} not one of {', '.join(allowed)}"
            )
    if opts["batch_size"] < 0 or opts["threads"] < 0:
        raise EngineOptionError("transformers: batch_size and threads must be >= 0")
    return opts


def _batch_key(waiting: _Waiting) -> tuple[Any, ...]:
    """Jobs with equal keys can share one generate() call without changing their output."""
    p = waiting.job.params
    key: tuple[Any, ...]
    if p.greedy:
        key = ("greedy", p.repetition_penalty)
    elif p.seed is not None:
        key = ("seeded", waiting.job.key)  # alone: the random draws depend on batch shape
    else:
        key = ("sampled", p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty)
    if p.repetition_penalty != 1.0:
        key += (len(waiting.input_ids),)  # no padding for the penalty to see
    return key


def _left_pad(
    torch: Any, batch: list[_Waiting], width: int, pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [[pad_id] * (width - len(w.input_ids)) + w.input_ids for w in batch]
    mask = [[0] * (width - len(w.input_ids)) + [1] * len(w.input_ids) for w in batch]
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(mask, dtype=torch.long, device=device),
    )


def _decode(tokenizer: Any, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _tokens_to_stop(tokenizer: Any, tokens: list[int], stops: list[str]) -> int:
    """The fewest leading tokens whose text holds a stop string (binary search)."""
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(_decode(tokenizer, tokens[:mid]), stops) is not None:
            hi = mid
        else:
            lo = mid + 1
    return hi


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
        return torch.float32
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


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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
