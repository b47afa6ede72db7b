"""The ExLlamaV2 engine: EXL2 (and unquantised or GPTQ) models on the slot's GPU(s).

One replica per worker, continuous batching with ExLlamaV2's dynamic generator. The
engine logic (prompts, length check, stop conditions, events) is shared with
ExLlamaV3 in :mod:`exl_common`; this module only loads the library and builds its
jobs. exllamav2 is imported inside ``load()`` only: importing it compiles a CUDA
extension and fails (OSError) on a machine without CUDA.

Written against exllamav2 0.3.2 (EXLLAMAV2_VERSION); :data:`EXLLAMAV2_API` lists every name
this module uses in the library, and tests/unit/engines/test_exl_conformance.py checks that
list against the installed sources (and this module against the list).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from exgen.daemon.engines.base import EngineUnavailable, SamplingParams, TokenLogprob
from exgen.daemon.engines.exl_common import (
    PAGE_SIZE,
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
from exgen.daemon.engines.grammar import SchemaMatcher, allowed_ids, mask_words, masked
from exgen.daemon.engines.logprobs import logprob_entries

log = logging.getLogger(__name__)

EXLLAMAV2_VERSION = "0.3.2"
# The generator evaluates up to max_q_size (8) tokens per job per step and requires
# max_batch_size × 8 ≤ the model's max_input_len (our max_chunk_size).
MAX_Q_SIZE = 8

_GEN = "exllamav2.generator"
_JOB_KWARGS = (
    "input_ids",
    "max_new_tokens",
    "min_new_tokens",
    "gen_settings",
    "seed",
    "stop_conditions",
    "decode_special_tokens",
    "token_healing",
    "identifier",
    "filters",
    "filter_prefer_eos",
    "return_logits",
)
_CACHE_KWARGS = ("model", "max_seq_len", "lazy")

# Every sampler field the library has, set on every job: its defaults are not neutral
# (temperature 0.8, top_k 50, top_p 0.8, repetition penalty 1.025).
# Fields that are per-job sampler *state*, not settings, are left to the library.
SAMPLER_STATE_FIELDS = frozenset(
    {"mirostat_mu", "post_sampling_hooks", "ngram_trie", "ngram_index", "ngram_history"}
)


def sampler_settings(params: SamplingParams) -> dict[str, Any]:
    """ExLlamaV2Sampler.Settings fields for a request: ours, and neutral for the rest."""
    greedy = params.greedy
    return {
        # Greedy is top_k=1 at temperature 1 (the library's own Settings.greedy()).
        "temperature": 1.0 if greedy else params.temperature,
        "top_k": 1 if greedy else params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "token_repetition_penalty": params.repetition_penalty,
        "token_repetition_range": -1,  # the whole sequence, as transformers does
        "token_repetition_decay": 0,
        # OpenAI's additive penalties; the library counts the prompt's tokens too
        "token_frequency_penalty": params.frequency_penalty,
        "token_presence_penalty": params.presence_penalty,
        "smoothing_factor": 0.0,
        "min_temp": 0.0,
        "max_temp": 0.0,
        "temp_exponent": 1.0,
        "top_a": 0.0,
        "tfs": 0.0,
        "typical": 0.0,
        "skew": 0.0,
        "temperature_last": False,
        "mirostat": False,
        "mirostat_tau": 1.5,
        "mirostat_eta": 0.1,
        "token_bias": None,
        "cfg_scale": None,
        "dry_allowed_length": 2,
        "dry_base": 1.75,
        "dry_multiplier": 0.0,
        "dry_sequence_breakers": None,
        "dry_range": 0,
        "dry_max_ngram": 20,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "xtc_ignore_tokens": None,
    }


_SAMPLER_FIELDS = tuple(sampler_settings(SamplingParams()))

EXLLAMAV2_API: tuple[ApiUse, ...] = (
    ApiUse("exllamav2:ExLlamaV2Config", "__init__", "method", ("model_dir",)),
    ApiUse("exllamav2:ExLlamaV2Config", "arch_compat_overrides", "method", ("quiet",)),
    ApiUse("exllamav2:ExLlamaV2Config", "max_seq_len", "attr"),
    ApiUse("exllamav2:ExLlamaV2Config", "max_input_len", "attr"),
    ApiUse("exllamav2:ExLlamaV2Config", "max_attention_size", "attr"),
    ApiUse("exllamav2:ExLlamaV2Config", "no_flash_attn", "attr"),
    ApiUse("exllamav2:ExLlamaV2", "__init__", "method", ("config",)),
    ApiUse("exllamav2:ExLlamaV2", "load", "method", ("gpu_split", "progress")),
    ApiUse("exllamav2:ExLlamaV2", "load_autosplit", "method", ("cache", "progress")),
    ApiUse(
        "exllamav2:ExLlamaV2",
        "load_tp",
        "method",
        ("gpu_split", "progress", "expect_cache_tokens", "expect_cache_base"),
    ),
    ApiUse("exllamav2:ExLlamaV2", "unload", "method"),
    ApiUse("exllamav2:ExLlamaV2Cache", "__init__", "method", _CACHE_KWARGS),
    ApiUse("exllamav2:ExLlamaV2Cache_Q4", "__init__", "method", _CACHE_KWARGS),
    ApiUse("exllamav2:ExLlamaV2Cache_Q6", "__init__", "method", _CACHE_KWARGS),
    ApiUse("exllamav2:ExLlamaV2Cache_Q8", "__init__", "method", _CACHE_KWARGS),
    ApiUse("exllamav2:ExLlamaV2Cache_TP", "__init__", "method", ("model", "base", "max_seq_len")),
    ApiUse("exllamav2:ExLlamaV2Tokenizer", "__init__", "method", ("config",)),
    ApiUse(
        "exllamav2:ExLlamaV2Tokenizer",
        "encode",
        "method",
        ("text", "add_bos", "encode_special_tokens"),
    ),
    ApiUse("exllamav2:ExLlamaV2Tokenizer", "eos_token_id", "attr"),
    ApiUse("exllamav2.attn:", "has_flash_attn_with_paged", "module_attr"),
    ApiUse(
        f"{_GEN}:ExLlamaV2DynamicGenerator",
        "__init__",
        "method",
        ("model", "cache", "tokenizer", "max_batch_size", "max_seq_len", "max_chunk_size", "paged"),
    ),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicGenerator", "enqueue", "method", ("job",)),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicGenerator", "cancel", "method", ("job",)),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicGenerator", "iterate", "method"),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicJob", "__init__", "method", _JOB_KWARGS),
    # Overridden by RawLogitsJob: the generator calls one, then the other, per step.
    ApiUse(f"{_GEN}:ExLlamaV2DynamicJob", "receive_logits", "method", ("logits",)),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicJob", "receive_sample", "method", ("logits",)),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicJob", "return_logits", "attr"),
    # Shut down on close(): the library never does (sampling_pool exists only when
    # the generator samples on several threads).
    ApiUse(f"{_GEN}:ExLlamaV2DynamicGenerator", "sampling_pool", "attr"),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicGenerator", "max_sampling_threads", "attr"),
    ApiUse(f"{_GEN}:ExLlamaV2DynamicGenerator", "filter_pool", "attr"),
    ApiUse(f"{_GEN}:ExLlamaV2Sampler.Settings", "__init__", "fields", _SAMPLER_FIELDS),
    ApiUse("exllamav2:ExLlamaV2Config", "vocab_size", "attr"),
    ApiUse(
        "exllamav2:ExLlamaV2Tokenizer",
        "get_id_to_piece_list",
        "method",
        ("include_special_tokens",),
    ),
    # The filter we subclass for structured output, and every hook of it we override
    # (the generator's sampler calls them; see SCHEMA_FILTER_HOOKS).
    ApiUse(f"{_GEN}.filters:ExLlamaV2Filter", "__init__", "method", ("model", "tokenizer")),
    *(
        ApiUse(f"{_GEN}.filters:ExLlamaV2Filter", hook, "method")
        for hook in (
            "begin",
            "feed",
            "next",
            "use_background_worker",
            "can_mask_logits",
            "prepare_logit_mask",
            "mask_logits",
        )
    ),
)
# Where iterate()'s result dicts are built, and the keys and values we read from them.
RESULT_SOURCE = "exllamav2/generator/dynamic.py"
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
    "logits",
)
# Where the library drives a filter: each hook our schema filter overrides is named
# there (the sampler takes the mask path when every filter can mask logits).
FILTER_CALLS = {
    "exllamav2/generator/dynamic.py": (
        "begin",
        "feed",
        "can_mask_logits",
        "use_background_worker",
        "background_prepare_logit_mask",
    ),
    "exllamav2/generator/filters/base.py": ("prepare_logit_mask", "next"),
    "exllamav2/generator/sampler.py": ("can_mask_logits", "get_next", "mask_logits"),
}


class ExLlamaV2Engine(ExlEngine):
    name = "exllamav2"
    library = "exllamav2"
    foreign_formats = frozenset({"exl3", "gguf"})

    def _open_library(self, model_dir: Path, opts: ExlOptions) -> LibraryAdapter:
        return ExLlamaV2Library(model_dir, opts)


class ExLlamaV2Library:
    """The loaded model, cache, tokenizer and dynamic generator (the LibraryAdapter)."""

    # The LibraryAdapter facts, set by _load().
    paged: bool
    max_batch_size: int
    max_seq_len: int
    eos_token_id: int | None
    vocab_size: int

    def __init__(self, model_dir: Path, opts: ExlOptions) -> None:
        self.opts = opts
        self.devices = require_cuda("exllamav2")
        try:
            from exllamav2.attn import has_flash_attn_with_paged
        except (ImportError, OSError, RuntimeError) as exc:  # OSError: no CUDA_HOME to build in
            raise EngineUnavailable(f"exllamav2 unavailable: {first_line(exc)}") from None
        warn_version("exllamav2", EXLLAMAV2_VERSION)
        try:
            self._load(model_dir, bool(has_flash_attn_with_paged))
        except EngineUnavailable:
            raise
        except Exception as exc:  # any failure here is a boot failure: restarting won't help
            raise EngineUnavailable(
                f"exllamav2 unavailable: cannot load {model_dir}: {first_line(exc)}"
            ) from exc

    def _load(self, model_dir: Path, flash_paged: bool) -> None:
        from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        opts = self.opts
        config = ExLlamaV2Config(model_dir=str(model_dir))
        config.arch_compat_overrides(quiet=True)
        config.max_seq_len = opts.max_seq_len or config.max_seq_len
        config.max_input_len = opts.max_chunk_size
        config.max_attention_size = opts.max_chunk_size**2
        # Batching needs paged attention (flash-attn >= 2.5.7, Ampere or newer);
        # without it the generator runs one job at a time.
        self.paged = flash_paged and not config.no_flash_attn
        cache_tokens = opts.cache_tokens
        if not self.paged:  # one job at a time: a cache beyond one sequence is waste
            cache_tokens = min(cache_tokens, -(-config.max_seq_len // PAGE_SIZE) * PAGE_SIZE)
        model = ExLlamaV2(config=config)
        self.split_mode = self._place(model, cache_tokens)
        # Autosplit may lower max_input_len; the generator's limits follow the model's.
        chunk = min(opts.max_chunk_size, config.max_input_len) // PAGE_SIZE * PAGE_SIZE
        chunk = max(PAGE_SIZE, chunk)
        self.max_batch_size = max(1, min(opts.max_batch_size, config.max_input_len // MAX_Q_SIZE))
        if not self.paged:
            self.max_batch_size = 1
        elif self.max_batch_size < opts.max_batch_size:
            log.warning(
                "exllamav2: max_batch_size lowered to %d (× %d must fit max_input_len %d)",
                self.max_batch_size,
                MAX_Q_SIZE,
                config.max_input_len,
            )
        # Library objects are typed Any: exllamav2 ships py.typed, but its annotations
        # do not all check (torch decorators), and we rely on the conformance tests.
        self._model: Any = model
        self._tokenizer: Any = ExLlamaV2Tokenizer(config=config)
        self._generator: Any = ExLlamaV2DynamicGenerator(
            model=model,
            cache=self._cache,
            tokenizer=self._tokenizer,
            max_batch_size=self.max_batch_size,
            max_seq_len=config.max_seq_len,
            max_chunk_size=chunk,
            paged=self.paged,
        )
        self.cache_tokens = cache_tokens
        # enqueue asserts unless prompt + max_new_tokens fits the cache's pages.
        self.max_seq_len = min(config.max_seq_len, cache_tokens)
        self.eos_token_id = self._tokenizer.eos_token_id
        self.vocab_size = int(config.vocab_size)
        self._pieces: list[str] = self._tokenizer.get_id_to_piece_list(include_special_tokens=False)

    def _place(self, model: Any, cache_tokens: int) -> str:
        """Load the weights onto the visible device(s) and build the cache to match."""
        from exllamav2 import ExLlamaV2Cache_TP

        opts = self.opts
        cache_class = _cache_class(opts.cache)
        if opts.tp:
            model.load_tp(
                gpu_split=opts.gpu_split,
                progress=False,
                expect_cache_tokens=cache_tokens,
                expect_cache_base=cache_class,
            )
            self._cache: Any = ExLlamaV2Cache_TP(
                model=model, base=cache_class, max_seq_len=cache_tokens
            )
            return "tp"
        if opts.autosplit or (opts.gpu_split is None and self.devices > 1):
            # Autosplit builds the cache while it fills the devices: a lazy cache.
            self._cache = cache_class(model=model, max_seq_len=cache_tokens, lazy=True)
            model.load_autosplit(cache=self._cache, progress=False)
            return "autosplit"
        model.load(gpu_split=opts.gpu_split, progress=False)
        self._cache = cache_class(model=model, max_seq_len=cache_tokens, lazy=False)
        return "gpu_split" if opts.gpu_split else "single"

    # -- the adapter surface --

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = self._tokenizer.encode(text=text, add_bos=add_bos, encode_special_tokens=True)
        return [int(t) for t in ids[0].tolist()]

    def submit(self, spec: JobSpec) -> Any:
        import torch
        from exllamav2.generator import ExLlamaV2Sampler

        # Annotated int upstream, but None is what asks for a random seed there.
        seed: Any = spec.params.seed
        filters = []
        if spec.grammar is not None:
            filters.append(schema_filter_class()(self._model, self._tokenizer, spec.grammar()))
        job = raw_logits_job_class()(
            input_ids=torch.tensor([spec.input_ids], dtype=torch.long),
            max_new_tokens=spec.max_new_tokens,
            min_new_tokens=spec.params.min_tokens,
            gen_settings=ExLlamaV2Sampler.Settings(**sampler_settings(spec.params)),
            seed=seed,
            stop_conditions=spec.stop_conditions,
            decode_special_tokens=not spec.params.skip_special_tokens,
            token_healing=False,
            identifier=spec.identifier,
            filters=filters,
            filter_prefer_eos=False,
            # The logits before sampling, for logprobs: the library's own token probs
            # are those after top-k/top-p (1.0 for every greedy token); RawLogitsJob
            # keeps them free of the penalties the sampler applies in place.
            return_logits=spec.top_logprobs is not None,
        )
        self._generator.enqueue(job=job)
        return job

    def token_logprobs(self, result: dict[str, Any], top: int) -> list[TokenLogprob]:
        """From the ``token_ids`` and ``logits`` (1, n, vocab) a result carries."""
        ids, logits = result.get("token_ids"), result.get("logits")
        if ids is None or logits is None:
            return []
        import torch

        return logprob_entries(torch, logits[0], ids[0].tolist(), top, self._piece)

    def _piece(self, token: int) -> str:
        return self._pieces[token] if token < len(self._pieces) else ""

    def cancel(self, handle: Any) -> None:
        self._generator.cancel(job=handle)

    def iterate(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self._generator.iterate()
        return results

    def describe(self) -> dict[str, Any]:
        return {
            "version": installed_version("exllamav2"),
            "paged": self.paged,
            "devices": self.devices,
            "split": self.split_mode,
            "cache": self.opts.cache,
            "cache_tokens": self.cache_tokens,
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
        }

    def close(self) -> None:
        """Free what the replica holds: the generator's two thread pools (the library
        never shuts them down), the weights, and the cache and generator, whose
        tensors would otherwise stay on the card until a garbage collection."""
        import gc

        import torch

        generator, self._generator = self._generator, None
        pools = [generator.filter_pool]
        if generator.max_sampling_threads > 1:  # else the generator has no sampling_pool
            pools.append(generator.sampling_pool)
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._model.unload()
        del generator
        self._cache = None
        gc.collect()  # the generator and its jobs refer to each other
        torch.cuda.empty_cache()


class RawLogitsMixin:
    """For an ExLlamaV2DynamicJob: the logits it returns (for logprobs) are the model's
    own. exllamav2's sampler applies the repetition, presence and frequency penalties
    to the step's logits in place, and the job then holds those penalised logits, so
    a request with penalties would get other logprobs here than on exllamav3, whose
    sampler works on a copy. Each step's logits are copied before sampling (only for
    jobs that return logits), and that copy is what the job holds.

    The generator calls ``receive_logits`` then ``receive_sample`` for a job, in turn
    (the first maybe on a sampling thread), so one pending copy per job suffices."""

    return_logits: bool
    _pre_sampling: Any = None

    def receive_logits(self, logits: Any) -> Any:
        if self.return_logits:
            self._pre_sampling = logits[:1].clone()
        return super().receive_logits(logits)  # type: ignore[misc]

    def receive_sample(self, logits: Any, *rest: Any) -> Any:
        if self._pre_sampling is not None:
            logits, self._pre_sampling = self._pre_sampling, None
        return super().receive_sample(logits, *rest)  # type: ignore[misc]


@functools.cache
def raw_logits_job_class() -> type:
    """``RawLogitsJob``, defined on first use (exllamav2 is imported in workers only)."""
    from exllamav2.generator import ExLlamaV2DynamicJob

    return type("RawLogitsJob", (RawLogitsMixin, ExLlamaV2DynamicJob), {})


@functools.cache
def schema_filter_class() -> type:
    """``SchemaFilter``, an ExLlamaV2Filter over a grammar.SchemaMatcher, defined on
    first use (exllamav2 is imported inside a worker only)."""
    import torch
    from exllamav2.generator.filters import ExLlamaV2Filter

    class SchemaFilter(ExLlamaV2Filter):
        """Masks the logits to the tokens the JSON Schema allows next. The mask is
        computed on the generator's filter thread while the GPU runs the forward pass
        (use_background_worker), and applied out of place, so the logits returned
        for logprobs stay the model's own."""

        def __init__(self, model: Any, tokenizer: Any, matcher: SchemaMatcher) -> None:
            super().__init__(model, tokenizer)
            self.matcher = matcher
            self.words = torch.full((mask_words(matcher.vocab_size),), -1, dtype=torch.int32)

        def begin(self, prefix_str: str) -> None:
            pass  # a fresh matcher per job: nothing to rewind

        def feed(self, token: Any) -> None:
            self.matcher.consume(int(token))

        def use_background_worker(self) -> bool:
            return True

        def can_mask_logits(self) -> bool:
            return True

        def prepare_logit_mask(self) -> bool:
            self.matcher.fill_mask(self.words)
            return True

        def mask_logits(self, logits: Any) -> Any:
            return masked(torch, logits, self.words)

        def next(self) -> tuple[set[int], set[int]]:
            # Only for a stack where another filter cannot mask: allowed ids as a set.
            self.matcher.fill_mask(self.words)
            return allowed_ids(torch, self.words, self.matcher.vocab_size), set()

    return SchemaFilter


def _cache_class(kind: str) -> Any:
    from exllamav2 import ExLlamaV2Cache, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8

    # Not ExLlamaV2Cache_8bit (FP8): the dynamic generator refuses it.
    classes = {
        "fp16": ExLlamaV2Cache,
        "q4": ExLlamaV2Cache_Q4,
        "q6": ExLlamaV2Cache_Q6,
        "q8": ExLlamaV2Cache_Q8,
    }
    return classes[kind]
