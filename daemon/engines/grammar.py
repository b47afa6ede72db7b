"""Structured output: a JSON Schema turned into a mask of the tokens allowed next.

The grammar engine is llguidance (the Rust engine behind Guidance; a backend of vLLM
and SGLang, and the one ExLlamaV3 ships a filter for). Chosen over xgrammar,
formatron, lm-format-enforcer and outlines-core after measuring each on the demo
model's tokenizer (bench/RESULTS.md, "Structured output"): it has no dependencies
(xgrammar pulls triton, 286 MB), builds its tokenizer from the model's
``tokenizer.json`` alone (so the exllama engines need no transformers), compiles a
schema lazily (under a millisecond, so a bad or huge schema costs its sender
little), bounds each step's work (its parser limits), and computes a mask in ~13 µs
median per token on one core, next to 10-100 ms a decoding step takes here.

One :class:`Grammars` per worker holds the tokenizer and every distinct schema it has
compiled (LRU, errors included: a 100,000-line file with one bad schema compiles it
once); a job gets a :class:`SchemaMatcher`, its own parser state. The JSON is
written as ``json.dumps`` writes it (``", "`` and ``": "``, no other whitespace): a
small model left free to add whitespace can spend its whole budget on newlines.

llguidance is imported on first use, inside workers only.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.engines.base import JobRejected

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # distinct schemas kept compiled per worker
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FIELD = "params.json_schema"
_MESSAGE_CHARS = 300


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise JobRejected(
            P.E_BAD_REQUEST,
            "structured output needs the llguidance package in the daemon's environment "
            "(pip install llguidance)",
            FIELD,
        ) from None
    return llguidance


class Grammars:
    """A worker's tokenizer for llguidance and its compiled schemas."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._compiled: OrderedDict[str, str | JobRejected] = OrderedDict()

    @classmethod
    def from_tokenizer_json(cls, text: str, eos_ids: list[int], vocab_size: int) -> Grammars:
        """From a model's ``tokenizer.json``; ``vocab_size``: the logits' width (a model's
        output layer may be wider than its tokenizer: those tokens are never allowed)."""
        llg = _llguidance()
        size = tokenizer_size(text)
        # generation_config may list end ids the tokenizer does not have (the scripted
        # test models do; some real ones pad their output layer): only real tokens end.
        eos = sorted(e for e in eos_ids if e < size) or None
        width = max(vocab_size, size)
        try:
            try:
                tokenizer = llg.LLTokenizer(text, n_vocab=width, eos_token=eos)
            except TypeError:  # llguidance < 1.7 takes one end token: the first ends too
                tokenizer = llg.LLTokenizer(text, n_vocab=width, eos_token=eos and eos[0])
        except ValueError as exc:
            raise JobRejected(
                P.E_ENGINE,
                f"structured output unavailable for this model's tokenizer: {exc}",
                FIELD,
            ) from None
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def compile(self, schema: str) -> str:
        """The grammar for a schema (compact JSON text), or JobRejected naming the problem."""
        found = self._compiled.get(schema)
        if found is None:
            found = self._compile(schema)
            self._compiled[schema] = found
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(schema)
        if isinstance(found, JobRejected):
            raise found
        return found

    def _compile(self, schema: str) -> str | JobRejected:
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            problem = llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        except (ValueError, RuntimeError) as exc:
            problem = str(exc)
            grammar = ""
        if problem:
            message = f"{FIELD}: cannot be compiled: {_short(problem)}"
            return JobRejected(P.E_BAD_REQUEST, message, FIELD)
        return str(grammar)

    def matcher(self, schema: str) -> SchemaMatcher:
        grammar = self.compile(schema)
        return SchemaMatcher(_llguidance().LLMatcher(self.tokenizer, grammar), self.vocab_size)


class SchemaMatcher:
    """One job's place in its grammar: fills the mask of allowed tokens, takes the
    chosen one. The mask is a packed int32 bitmask (bit ``t % 32`` of word ``t // 32``
    set: token ``t`` allowed), as llguidance writes it."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # tokens the mask covers

    def fill_mask(self, words: Any) -> None:
        """Write the mask into ``words``: a contiguous int32 CPU tensor of mask_words()."""
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def stopped(self) -> bool:
        """Nothing but an end of sequence may follow."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        """What went wrong (a parser limit, a token the mask did not allow), if anything."""
        return _short(self._matcher.get_error()) if self._matcher.is_error() else None


def tokenizer_size(text: str) -> int:
    """Tokens in a tokenizer.json: its model's vocabulary and its added tokens."""
    spec = json.loads(text)
    vocab = (spec.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
    ids += [t.get("id", 0) for t in spec.get("added_tokens") or () if isinstance(t, dict)]
    return max((i for i in ids if isinstance(i, int)), default=-1) + 1


def mask_words(vocab_size: int) -> int:
    """int32 words of a bitmask over ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def masked(torch: Any, logits: Any, words: Any) -> Any:
    """``logits`` (rows x vocab, or one row) with the tokens ``words`` (a bitmask per
    row) does not allow set to -inf; out of place, the model's logits stay as they are."""
    rows = words if words.dim() == 2 else words.unsqueeze(0)
    allowed = allowed_tokens(torch, rows, logits.shape[-1]).to(logits.device)
    return logits.masked_fill(~allowed.view(logits.shape), float("-inf"))


def allowed_ids(torch: Any, words: Any, vocab_size: int) -> set[int]:
    """The token ids one bitmask row allows."""
    allowed = allowed_tokens(torch, words.unsqueeze(0), vocab_size)[0]
    return set(allowed.nonzero().flatten().tolist())


def allowed_tokens(torch: Any, words: Any, width: int) -> Any:
    """Bitmask rows (int32, rows x words) as a bool tensor (rows x ``width``); tokens
    past the mask's end are not allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).view(words.shape[0], -1).bool()
    if bits.shape[1] >= width:
        return bits[:, :width]
    pad = torch.zeros((words.shape[0], width - bits.shape[1]), dtype=torch.bool)
    return torch.cat([bits, pad.to(words.device)], dim=1)


def _short(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MESSAGE_CHARS else line[: _MESSAGE_CHARS - 1] + "…"
