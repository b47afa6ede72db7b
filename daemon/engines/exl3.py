"""The ExLlamaV3 engine: EXL3 (and unquantised) models on the slot's GPU(s).

ExLlamaV3 is the maintained successor of exllamav2 (archived upstream). Its
Generator / Job / Cache API mirrors the V2 dynamic generator, so the engine logic is
the one in :mod:`exl_common`; this module loads the library and builds its jobs.
Differences that matter here: the cache is created *before* ``model.load()`` (loading
allocates it), paged attention needs no flash-attn (the library has its own
kernels), the sampler is a stack built per job (:class:`ComboSampler`), a job's own
failure comes back as an ``"error"`` result instead of an exception, and a job
reserves one token beyond prompt + max_new_tokens in the cache.

exllamav3 is imported inside ``load()`` only (it compiles its extension at import
when no prebuilt one matches). :data:`EXLLAMAV3_API` lists every name used, checked
against the installed sources by tests/unit/engines/test_exl_conformance.py.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exgen.daemon.engines.base import EngineUnavailable, SamplingParams, TokenLogprob
from exgen.daemon.engines.exl_common import (
    ApiUse,
    ExlEngine,
    ExlOptions,
    JobSpec,
    LibraryAdapter,
    first_line,
    installed_version,
    require_cuda,
    warn_version,
)
from exgen.daemon.engines.grammar import SchemaMatcher, mask_words

log = logging.getLogger(__name__)

EXLLAMAV3_VERSION = "1.6.5"
CACHE_BITS = {"q4": 4, "q6": 6, "q8": 8}
# A v3 job holds prompt + max_new_tokens + 1 tokens of cache (its prepare_for_queue).
JOB_CACHE_OVERHEAD = 1


def sampler_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Every ComboSampler argument: ours, and neutral for the rest (the library's
    DefaultSampler is min_p 0.08 at temperature 0.8 — not what a request means)."""
    return {
        "rep_p": params.repetition_penalty,
        # OpenAI's additive penalties; the library counts the prompt's tokens too
        "freq_p": params.frequency_penalty,
        "pres_p": params.presence_penalty,
        "rep_sustain_range": int(10e7),  # the whole sequence, as transformers does
        "rep_decay_range": 0,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_range": 0,
        "dry_sequence_breakers": None,
        "temperature": 0.0 if params.greedy else params.temperature,  # 0: argmax
        "min_p": params.min_p,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "temp_last": False,
        "adaptive_target": 1.0,
        "adaptive_decay": 0.9,
        "logit_bias": None,
    }


_SAMPLER_KWARGS = tuple(sampler_kwargs(SamplingParams()))
_JOB_KWARGS = (
    "input_ids",
    "max_new_tokens",
    "min_new_tokens",
    "sampler",
    "seed",
    "stop_conditions",
    "decode_special_tokens",
    "token_healing",
    "identifier",
    "filters",
    "return_probs",
    "return_top_tokens",
)
_LOAD_KWARGS = ("device", "use_per_device", "tensor_p", "progressbar", "max_chunk_size")

EXLLAMAV3_API: tuple[ApiUse, ...] = (
    ApiUse("exllamav3:Config", "from_directory", "method", ("directory",)),
    ApiUse("exllamav3:Config", "max_position_embeddings", "attr"),
    ApiUse("exllamav3:Model", "from_config", "method", ("config",)),
    ApiUse("exllamav3:Model", "load", "method", _LOAD_KWARGS, via="exllamav3:Model.load_gen"),
    ApiUse("exllamav3:Model", "load_gen", "method", _LOAD_KWARGS),
    ApiUse("exllamav3:Model", "unload", "method"),
    ApiUse(
        "exllamav3:Cache",
        "__init__",
        "method",
        ("model", "max_num_tokens", "layer_type", "max_batch_size"),
    ),
    ApiUse(
        "exllamav3:Cache",
        "__init__",
        "method",
        ("k_bits", "v_bits"),
        via="exllamav3:CacheLayer_quant.__init__",
    ),
    ApiUse("exllamav3:CacheLayer_fp16"),
    ApiUse("exllamav3:CacheLayer_quant", "__init__", "method", ("k_bits", "v_bits")),
    ApiUse("exllamav3:Tokenizer", "from_config", "method", ("config",)),
    ApiUse("exllamav3:Tokenizer", "encode", "method", ("text", "add_bos", "encode_special_tokens")),
    ApiUse("exllamav3:Tokenizer", "eos_token_id", "attr"),
    ApiUse(
        "exllamav3:Generator",
        "__init__",
        "method",
        ("model", "cache", "tokenizer", "max_batch_size", "max_chunk_size"),
    ),
    ApiUse("exllamav3:Generator", "enqueue", "method", ("job",)),
    ApiUse("exllamav3:Generator", "cancel", "method", ("job",)),
    ApiUse("exllamav3:Generator", "iterate", "method"),
    ApiUse("exllamav3:Generator", "close", "method"),
    ApiUse("exllamav3:Job", "__init__", "method", _JOB_KWARGS),
    ApiUse("exllamav3:ComboSampler", "__init__", "method", _SAMPLER_KWARGS),
    ApiUse("exllamav3:Generator", "padded_vocab_size", "attr"),
    ApiUse("exllamav3:Tokenizer", "get_id_to_piece_list", "method", ("include_special_tokens",)),
    # The filter we subclass for structured output, and every hook of it we override.
    ApiUse(
        "exllamav3:Filter",
        "__init__",
        "method",
        ("tokenizer", "trigger_token", "prefix_str", "eos_after_completed"),
    ),
    *(
        ApiUse("exllamav3:Filter", hook, "method")
        for hook in ("reset", "accept_token", "get_next_logit_mask", "is_completed")
    ),
)
RESULT_SOURCE = "exllamav3/generator/job.py"
RESULT_STRINGS = (
    "job",
    "stage",
    "streaming",
    "eos",
    "eos_reason",
    "text",
    "new_tokens",
    "prompt_tokens",
    "identifier",
    "held",
    "eos_triggering_token_str",
    "eos_triggering_string",
    "stop_token",
    "stop_string",
    "max_new_tokens",
    "token_ids",
    "token_probs",
    "top_k_tokens",
    "top_k_probs",
    "end_filter",
)
# Where the job drives its filters: each hook our schema filter overrides is called.
FILTER_CALLS = {
    "exllamav3/generator/generator.py": ("get_next_logit_mask", "use_background_worker"),
    "exllamav3/generator/job.py": ("attach", "reset", "feed"),
    "exllamav3/generator/filter/filter.py": ("accept_token", "is_completed", "reset"),
    # a packed int32 mask (what get_next_logit_mask returns) is applied as bits
    "exllamav3/generator/sampler/custom.py": ("apply_logit_bitmask", "int32"),
}
# The per-job failure result comes from the generator module.
ERROR_SOURCE = "exllamav3/generator/generator.py"
ERROR_STRINGS = ("stage", "error", "eos", "job")


class ExLlamaV3Engine(ExlEngine):
    name = "exllamav3"
    library = "exllamav3"
    foreign_formats = frozenset({"exl2", "gguf"})

    def _open_library(self, model_dir: Path, opts: ExlOptions) -> LibraryAdapter:
        return ExLlamaV3Library(model_dir, opts)


class ExLlamaV3Library:
    """The loaded model, cache, tokenizer and generator (the LibraryAdapter)."""

    # The LibraryAdapter facts, set by _load().
    max_batch_size: int
    max_seq_len: int
    eos_token_id: int | None
    vocab_size: int

    paged = True  # ExLlamaV3 always pages its cache (own attention kernels)

    def __init__(self, model_dir: Path, opts: ExlOptions) -> None:
        self.opts = opts
        self.devices = require_cuda("exllamav3")
        try:
            import exllamav3  # noqa: F401 - the import is the availability check
        except (ImportError, OSError, RuntimeError) as exc:
            raise EngineUnavailable(f"exllamav3 unavailable: {first_line(exc)}") from None
        warn_version("exllamav3", EXLLAMAV3_VERSION)
        try:
            self._load(model_dir)
        except EngineUnavailable:
            raise
        except Exception as exc:  # any failure here is a boot failure: restarting won't help
            raise EngineUnavailable(
                f"exllamav3 unavailable: cannot load {model_dir}: {first_line(exc)}"
            ) from exc

    def _load(self, model_dir: Path) -> None:
        from exllamav3 import Config, Generator, Model, Tokenizer

        opts = self.opts
        # Library objects are typed Any: exllamav3 ships py.typed, but its annotations
        # do not all check, and the conformance tests are what keep us honest.
        config: Any = Config.from_directory(directory=str(model_dir))
        model: Any = Model.from_config(config=config)
        # The cache must exist before load(): loading allocates it on the layers' devices.
        self._cache: Any = _make_cache(model, opts)
        self.split_mode = self._place(model)
        self._model: Any = model
        self._tokenizer: Any = Tokenizer.from_config(config=config)
        self._generator: Any = Generator(
            model=model,
            cache=self._cache,
            tokenizer=self._tokenizer,
            max_batch_size=opts.max_batch_size,
            max_chunk_size=opts.max_chunk_size,
        )
        self.max_batch_size = opts.max_batch_size
        # ExLlamaV3 never checks positions against the model's context: we do.
        context = opts.max_seq_len or int(config.max_position_embeddings)
        self.max_seq_len = min(context, opts.cache_tokens - JOB_CACHE_OVERHEAD)
        self.eos_token_id = self._tokenizer.eos_token_id
        # A filter's mask covers the padded vocabulary (the job attaches it so).
        self.vocab_size = int(self._generator.padded_vocab_size)
        self._pieces: list[str] = self._tokenizer.get_id_to_piece_list(include_special_tokens=False)

    def _place(self, model: Any) -> str:
        """Load the weights onto the slot's visible device(s) (CUDA_VISIBLE_DEVICES)."""
        chunk = self.opts.max_chunk_size  # informs the split's activation estimate
        split = self.opts.gpu_split
        if self.opts.tp:
            model.load(tensor_p=True, use_per_device=split, progressbar=False, max_chunk_size=chunk)
            return "tp"
        if split is not None:
            model.load(use_per_device=split, progressbar=False, max_chunk_size=chunk)
            return "gpu_split"
        if self.opts.autosplit or self.devices > 1:
            # No device and no split: the library fills the visible devices in turn.
            model.load(progressbar=False, max_chunk_size=chunk)
            return "autosplit"
        model.load(device="cuda:0", progressbar=False, max_chunk_size=chunk)
        return "single"

    # -- the adapter surface --

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = self._tokenizer.encode(text=text, add_bos=add_bos, encode_special_tokens=True)
        return [int(t) for t in ids[0].tolist()]

    def submit(self, spec: JobSpec) -> Any:
        import torch
        from exllamav3 import ComboSampler, Job

        # Annotated int upstream, but None is what asks for a random seed there.
        seed: Any = spec.params.seed
        filters = []
        if spec.grammar is not None:
            filters.append(schema_filter_class()(self._tokenizer, spec.grammar))
        wants = spec.top_logprobs is not None
        job = Job(
            input_ids=torch.tensor([spec.input_ids], dtype=torch.long),
            max_new_tokens=spec.max_new_tokens,
            min_new_tokens=spec.params.min_tokens,
            sampler=ComboSampler(**sampler_kwargs(spec.params)),
            seed=seed,
            stop_conditions=spec.stop_conditions,
            decode_special_tokens=not spec.params.skip_special_tokens,
            token_healing=False,
            identifier=spec.identifier,
            filters=filters,
            # Softmax of the logits before the sampler (and before the filter's mask).
            return_probs=wants,
            return_top_tokens=spec.top_logprobs or 0,
        )
        self._generator.enqueue(job=job)
        return job

    def token_logprobs(self, result: dict[str, Any], top: int) -> list[TokenLogprob]:
        """From ``token_ids``, ``token_probs`` (1, n) and ``top_k_tokens`` /
        ``top_k_probs`` (1, n, k): probabilities, logged here."""
        ids, probs = result.get("token_ids"), result.get("token_probs")
        if ids is None or probs is None:
            return []
        top_ids = result.get("top_k_tokens")
        top_probs = result.get("top_k_probs")
        alternatives: list[list[Any]] = [[] for _ in range(ids.shape[-1])]
        if top and top_ids is not None and top_probs is not None:
            alternatives = [
                [[self._piece(t), _log(p)] for t, p in zip(row_t, row_p, strict=True)]
                for row_t, row_p in zip(top_ids[0].tolist(), top_probs[0].tolist(), strict=True)
            ]
        return [
            [self._piece(t), _log(p), alts]
            for t, p, alts in zip(ids[0].tolist(), probs[0].tolist(), alternatives, strict=True)
        ]

    def _piece(self, token: int) -> str:
        return self._pieces[token] if token < len(self._pieces) else ""

    def cancel(self, handle: Any) -> None:
        self._generator.cancel(job=handle)

    def iterate(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self._generator.iterate()
        return results

    def describe(self) -> dict[str, Any]:
        return {
            "version": installed_version("exllamav3"),
            "paged": True,
            "devices": self.devices,
            "split": self.split_mode,
            "cache": self.opts.cache,
            "cache_tokens": self.opts.cache_tokens,
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
        }

    def close(self) -> None:
        self._generator.close()
        self._model.unload()


def _log(probability: float) -> float:
    return math.log(probability) if probability > 0 else -math.inf


@functools.cache
def schema_filter_class() -> type:
    """``SchemaFilter``, an exllamav3 Filter over a grammar.SchemaMatcher, defined on
    first use (exllamav3 is imported inside a worker only)."""
    import torch
    from exllamav3 import Filter

    class SchemaFilter(Filter):
        """The tokens the JSON Schema allows next, as the packed int32 bitmask the
        library's samplers take; completing the schema ends the job (end_filter), so
        nothing unconstrained follows it."""

        def __init__(self, tokenizer: Any, make_matcher: Callable[[], SchemaMatcher]) -> None:
            super().__init__(
                tokenizer=tokenizer, trigger_token=None, prefix_str=None, eos_after_completed=True
            )
            self.make_matcher = make_matcher
            self.matcher = make_matcher()
            self.words = torch.full((1, mask_words(self.matcher.vocab_size)), -1, dtype=torch.int32)

        def reset(self) -> None:
            self.matcher = self.make_matcher()

        def accept_token(self, token: int) -> None:
            self.matcher.consume(int(token))

        def get_next_logit_mask(self) -> Any:
            self.matcher.fill_mask(self.words[0])
            return self.words

        def is_completed(self) -> bool:
            return self.matcher.stopped

    return SchemaFilter


def _make_cache(model: Any, opts: ExlOptions) -> Any:
    """The paged KV cache: fp16 layers, or K/V quantised to 4, 6 or 8 bits."""
    from exllamav3 import Cache, CacheLayer_fp16, CacheLayer_quant

    if opts.cache == "fp16":
        return Cache(
            model=model,
            max_num_tokens=opts.cache_tokens,
            layer_type=CacheLayer_fp16,
            max_batch_size=opts.max_batch_size,
        )
    bits = CACHE_BITS[opts.cache]
    # k_bits/v_bits travel through Cache's **kwargs to CacheLayer_quant.
    return Cache(
        model=model,
        max_num_tokens=opts.cache_tokens,
        layer_type=CacheLayer_quant,
        max_batch_size=opts.max_batch_size,
        k_bits=bits,
        v_bits=bits,
    )
