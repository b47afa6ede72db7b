"""What the transformers engine's tests share: a loaded engine on the demo model,
running jobs to the end, and plain transformers' own answer to compare with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from exgen.daemon.engines.base import Event, Finished, Job
from exgen.daemon.engines.hf import TransformersEngine


@contextmanager
def loaded_engine(**options: str) -> Iterator[TransformersEngine]:
    """The engine on the demo model with these options, loaded; closed after."""
    engine = TransformersEngine(None, options)
    engine.load()
    try:
        yield engine
    finally:
        engine.close()


def run(engine: TransformersEngine, *jobs: Job) -> dict[int, Finished]:
    for j in jobs:
        engine.add(j)
    events: list[Event] = []
    while engine.pending:
        events.extend(engine.step())
    return {e.key: e for e in events if isinstance(e, Finished)}


def direct_generate(engine: TransformersEngine, j: Job) -> tuple[str, int]:
    """Plain transformers: one prompt, model.generate, greedy."""
    state = engine._loaded()
    tokenizer, model = state.tokenizer, state.model
    if j.messages is not None:
        enc = tokenizer.apply_chat_template(
            j.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tokenizer(j.prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=j.params.max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)
