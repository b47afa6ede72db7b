"""The synthetic engine's shortcuts give what its general path gives.

A one-sample job that ends with nothing to look for (no stop strings, no logprobs)
is finished without the per-sample bookkeeping (``_plain_end``), and up to 32 tokens
are drawn from one hash block without the loop. A stop string that never appears
sends the same job down the general path: the events must be the same.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from exgen.daemon.engines import synthetic
from exgen.daemon.engines.base import Chunk, Finished, Job, SamplingParams
from exgen.daemon.engines.synthetic import SyntheticEngine

NEVER = "\x00never seen"  # a stop string no synthetic text holds
SCHEMA = '{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"string"}}}'
JOBS: list[tuple[str | None, list[dict[str, str]] | None, dict[str, Any]]] = [
    ("p0", None, {"max_new_tokens": 1}),
    ("a longer prompt", None, {"max_new_tokens": 7, "seed": 3}),
    ("len=3 ends early", None, {"max_new_tokens": 9}),
    ("p1", None, {"max_new_tokens": 32}),
    ("p2", None, {"max_new_tokens": 33}),
    ("p3", None, {"max_new_tokens": 100, "temperature": 0.8}),
    (None, [{"role": "user", "content": "chat"}], {"max_new_tokens": 5}),
    ("schema", None, {"max_new_tokens": 200, "json_schema": SCHEMA}),
    ("cut short", None, {"max_new_tokens": 2, "json_schema": SCHEMA}),
]


def events_of(opts: dict[str, str], never_stop: bool, stream: bool) -> list[tuple[Any, ...]]:
    engine = SyntheticEngine(None, {"eos_from_prompt": "1", **opts})
    engine.load()
    for key, (prompt, messages, params) in enumerate(JOBS):
        if never_stop:
            params = {**params, "stop": [NEVER]}
        engine.add(Job(key, prompt, messages, SamplingParams.from_wire(params), stream))
    out: list[tuple[Any, ...]] = []
    while engine.pending:
        for event in engine.step():
            if isinstance(event, Finished):
                out.append(
                    (event.key, event.text, event.finish_reason, event.prompt_tokens,
                     event.completion_tokens, event.logprobs, event.choices)
                )  # fmt: skip
            else:
                assert isinstance(event, Chunk)
                out.append((event.key, event.text))
    return out


@pytest.mark.parametrize(
    "opts", [{}, {"token_ms": "0.001"}, {"capacity": "2", "token_ms": "0.001"}]
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_plain_end_is_the_general_paths_end(opts: dict[str, str], stream: bool) -> None:
    fast = events_of(opts, never_stop=False, stream=stream)
    general = events_of(opts, never_stop=True, stream=stream)
    assert fast == general
    assert len([e for e in fast if len(e) > 2]) == len(JOBS)


def looped_tokens(prompt: str, seed: int | None, count: int, sample: int = 0) -> list[str]:
    """synthetic_tokens as it was written before its one-block shortcut."""
    salt = f"{seed}|{prompt}" if sample == 0 else f"{seed}|{sample}|{prompt}"
    block = hashlib.blake2b(salt.encode(), digest_size=16).digest()
    out: list[str] = []
    while len(out) < count:
        block = hashlib.blake2b(block, digest_size=32).digest()
        out.extend(synthetic._PIECE_OF_BYTE[b] for b in block[: count - len(out)])
    return out


@pytest.mark.parametrize("count", [0, 1, 2, 31, 32, 33, 64, 65, 200])
@pytest.mark.parametrize("sample", [0, 2])
def test_one_hash_block_draws_the_tokens_the_loop_drew(count: int, sample: int) -> None:
    for prompt, seed in (("p", None), ("another prompt", 7)):
        got = synthetic.synthetic_tokens(prompt, seed, count, sample)
        assert got == looped_tokens(prompt, seed, count, sample)
