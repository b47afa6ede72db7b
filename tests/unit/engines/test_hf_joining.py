"""Continuous batching in the transformers engine: jobs that arrive while a batch runs
join it at the next step, on the real demo model in fp32.

A joined row's output must equal plain transformers' one prompt at a time, token for
token (fp32: the batch a row decodes in does not change its greedy output), whether
its prompt is shorter or longer than what the batch holds so far (room made on the
left), and whether its prompt's blocks come from the prefix cache. In the exact mode
(``exact=true``) a job waits for the running batch to end, as before.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exgen.daemon.engines.base import Event, Finished, Job, SamplingParams
from exgen.daemon.engines.hf import TransformersEngine
from tests.unit.engines.hf_support import direct_generate, loaded_engine

pytest.importorskip("transformers")

FIRST = ["The capital of France is", "def fibonacci(n):"]
LATER = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at",
]


@pytest.fixture(scope="module")
def engine() -> Iterator[TransformersEngine]:
    with loaded_engine(threads="2", batch_size="8", dtype="float32") as eng:
        yield eng


def greedy(key: int, prompt: str, new: int) -> Job:
    return Job(key, prompt, None, SamplingParams(max_new_tokens=new))


def fixed(key: int, prompt: str, new: int) -> Job:
    """Exactly ``new`` tokens (no EOS): a row that ends when the test says."""
    return Job(key, prompt, None, SamplingParams(max_new_tokens=new, ignore_eos=True))


def drive(engine: TransformersEngine, first: list[Job], later: list[Job], after: int) -> dict:
    """Run ``first``; after ``after`` steps add ``later``; the step each job finished."""
    for j in first:
        engine.add(j)
    finished: dict[int, tuple[Finished, int]] = {}
    steps = 0
    while engine.pending or steps <= after:
        if steps == after:
            for j in later:
                engine.add(j)
        events: list[Event] = engine.step()
        steps += 1
        for e in events:
            if isinstance(e, Finished):
                finished[e.key] = (e, steps)
    return finished


def test_jobs_join_a_running_batch_and_match_transformers(engine: TransformersEngine) -> None:
    first = [greedy(i, p, 20) for i, p in enumerate(FIRST)]
    later = [greedy(10 + i, p, 8) for i, p in enumerate(LATER)]
    finished = drive(engine, first, later, after=3)
    for j in first + later:
        text, count = direct_generate(engine, j)
        assert finished[j.key][0].text == text, j.prompt
        assert finished[j.key][0].completion_tokens == count
    # joined at step 4: finished 8 tokens later, long before the first batch's 21 steps
    assert all(finished[j.key][1] <= 4 + 8 for j in later)


def test_a_joined_prompt_uses_the_prefix_cache(engine: TransformersEngine) -> None:
    prompt = LATER[0] + " loved the sea more than anything else in the world."
    drive(engine, [greedy(20, prompt, 2)], [], after=0)  # its blocks now cached
    saved = engine.counters()["prefill_tokens_saved"]
    later = greedy(22, prompt + " One day", 6)
    finished = drive(engine, [greedy(21, FIRST[0], 12)], [later], after=2)
    assert engine.counters()["prefill_tokens_saved"] > saved
    assert finished[22][0].text == direct_generate(engine, later)[0]


def test_exact_mode_lets_the_running_batch_finish_first() -> None:
    with loaded_engine(threads="2", batch_size="8", dtype="float32", exact="true") as eng:
        finished = drive(eng, [greedy(1, FIRST[0], 10)], [greedy(2, LATER[1], 2)], after=2)
    assert finished[2][1] > finished[1][1]


def test_a_full_batch_takes_waiting_rows_in_groups() -> None:
    """A full batch whose rows end one at a time does not copy its cache for each: the
    waiting rows join once it has room for an eighth of the batch (here 2 of 16) or for
    all of them; their output is still plain transformers'."""
    with loaded_engine(threads="2", batch_size="16", dtype="float32") as eng:
        prompts = [f"{FIRST[i % 2]} {i}" for i in range(16)]
        waiting = LATER  # 2 of them
        one_short = [fixed(i, p, 3 if i == 0 else 24) for i, p in enumerate(prompts)]
        later = [greedy(100 + i, p, 4) for i, p in enumerate(waiting)]
        finished = drive(eng, one_short, later, after=1)
        # One row of room (the short one ended) is less than min(2 waiting, 16 // 8):
        # they waited for the batch to end.
        assert all(finished[j.key][1] > 24 for j in later)

        two_short = [fixed(i, p, 3 if i < 2 else 24) for i, p in enumerate(prompts)]
        later = [greedy(200 + i, p, 4) for i, p in enumerate(waiting)]
        finished = drive(eng, two_short, later, after=1)
        assert all(finished[j.key][1] <= 4 + 4 + 1 for j in later)  # joined at once
        for j in later:
            assert finished[j.key][0].text == direct_generate(eng, j)[0]
