"""The grammar module on a small real tokenizer (a byte-level BPE trained here): schemas
compile once, bad ones are named, masks allow exactly what the schema allows — a
random walk over the allowed tokens always ends in JSON that validates."""

from __future__ import annotations

import json
import random
from functools import cache

import jsonschema
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer

from exgen.client import protocol as P
from exgen.daemon.engines.base import JobRejected
from exgen.daemon.engines.grammar import (
    Grammars,
    allowed_ids,
    allowed_tokens,
    mask_words,
    masked,
)

EOS = "<eos>"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "label": {"enum": ["positive", "negative", "neutral"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "label"],
    "additionalProperties": False,
}


@cache
def tiny_tokenizer_json() -> str:
    """A byte-level BPE tokenizer.json with a few hundred tokens and an EOS."""
    tokenizer = ByteLevelBPETokenizer()
    corpus = [json.dumps({"name": "Alice", "age": 30, "ok": True, "label": "positive"})] * 40
    corpus += ['{"tags": ["a", "b"], "label": "negative neutral"}'] * 40
    tokenizer.train_from_iterator(corpus, vocab_size=320, special_tokens=[EOS])
    return tokenizer._tokenizer.to_str()


def grammars(vocab_extra: int = 0) -> tuple[Grammars, Tokenizer, int]:
    text = tiny_tokenizer_json()
    tok = Tokenizer.from_str(text)
    eos = tok.token_to_id(EOS)
    return Grammars.from_tokenizer_json(text, [eos], tok.get_vocab_size() + vocab_extra), tok, eos


def test_a_schema_compiles_once_and_a_bad_one_is_named_once():
    g, _, _ = grammars()
    schema = json.dumps(SCHEMA)
    assert g.compile(schema) is g.compile(schema)
    bad = json.dumps({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})
    for _ in range(2):
        with pytest.raises(JobRejected) as info:
            g.compile(bad)
        assert info.value.code == P.E_BAD_REQUEST and info.value.field == "params.json_schema"
        assert "cannot be compiled" in info.value.message and "nope" in info.value.message
    assert len(g._compiled) == 2  # the error is kept too
    for schema, words in [
        ({"type": "strange"}, "strange"),
        ({"type": "string", "pattern": "(a"}, "regex"),
        ({"type": "object", "minProperties": 3, "maxProperties": 1}, "Unsatisfiable"),
    ]:
        with pytest.raises(JobRejected, match=words):
            g.compile(json.dumps(schema))


def _walk(g: Grammars, tok: Tokenizer, eos: int, schema: str, rng: random.Random) -> str:
    matcher = g.matcher(schema)
    words = torch.zeros(mask_words(g.vocab_size), dtype=torch.int32)
    ids: list[int] = []
    for _ in range(400):
        matcher.fill_mask(words)
        allowed = sorted(allowed_ids(torch, words, g.vocab_size))
        assert allowed, "the mask allows nothing"
        token = eos if eos in allowed else rng.choice(allowed)
        if token == eos:
            return str(tok.decode(ids))
        matcher.consume(token)
        assert matcher.error is None
        ids.append(token)
    raise AssertionError(f"no end after 400 tokens: {tok.decode(ids)!r}")


def test_random_walks_over_the_mask_always_give_valid_json():
    g, tok, eos = grammars()
    rng = random.Random(7)
    schema = json.dumps(SCHEMA)
    outputs = {_walk(g, tok, eos, schema, rng) for _ in range(30)}
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert ", " in text and ": " in text  # written as json.dumps writes it
    assert len(outputs) > 20


def test_json_object_mode_gives_an_object():
    g, tok, eos = grammars()
    text = _walk(g, tok, eos, P.JSON_OBJECT_SCHEMA, random.Random(1))
    assert isinstance(json.loads(text), dict)


def test_masking_sets_exactly_the_disallowed_logits_to_minus_infinity():
    g, _, _ = grammars(vocab_extra=40)  # an output layer wider than the tokenizer
    matcher = g.matcher(json.dumps(SCHEMA))
    words = torch.zeros(mask_words(g.vocab_size), dtype=torch.int32)
    matcher.fill_mask(words)
    width = 32 * len(words) + 7  # wider still than the mask: the rest is never allowed
    logits = torch.randn(width)
    out = masked(torch, logits, words)
    allowed = allowed_ids(torch, words, g.vocab_size)
    kept = set(torch.isfinite(out).nonzero().flatten().tolist())
    assert kept == allowed and allowed  # only '{' may start an object
    assert torch.equal(out[sorted(allowed)], logits[sorted(allowed)])
    assert torch.isfinite(logits).all()  # out of place
    rows = torch.stack([words, torch.full_like(words, -1)])
    both = allowed_tokens(torch, rows, width)
    assert both.shape == (2, width) and both[1, : g.vocab_size].all()
    assert not both[:, 32 * len(words) :].any()
