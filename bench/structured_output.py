"""Structured output on the demo model: tokens/s with and without a JSON Schema, and what
the grammar costs per token. Writes its section of bench/RESULTS.md and prints the JSON.

The transformers engine in-process (the worker's own engine, no daemon around it),
the same chat prompts in both modes, rounds alternating free / schema so load on a
shared machine hits both alike. The grammar's cost is timed inside the engine: every
call of the batch hooks that compute the masks, apply them and feed the chosen
tokens to the matchers (hf_features.BatchFeatures.constrain and .chosen), divided by
the constrained tokens generated.

    .venv/bin/python bench/structured_output.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

# As a worker runs (daemon/cpu_layout.py): OpenMP threads sleep at a barrier
# instead of spinning, so CPU time is work done, not waiting for a loaded machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchlib import machine, median
from peers import write_section

from exgen.client import protocol as P
from exgen.daemon.engines import hf_features
from exgen.daemon.engines.base import Finished, Job, SamplingParams
from exgen.daemon.engines.hf import TransformersEngine

logger = logging.getLogger("bench.structured_output")

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "family_friendly": {"type": "boolean"},
        "genre": {"enum": ["drama", "comedy", "horror", "science fiction", "documentary"]},
    },
    "required": ["title", "year", "rating", "family_friendly", "genre"],
    "additionalProperties": False,
}
TOPICS = ["a storm at sea", "a robot chef", "a haunted library", "two rival bakers", "Mars"]


class GrammarClock:
    """Wraps the batch hooks to time them (seconds) and count constrained tokens."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0
        self._constrain = hf_features.BatchFeatures.constrain
        self._chosen = hf_features.BatchFeatures.chosen

    def install(self) -> None:
        clock = self

        def constrain(features: Any, extras: Any, scores: Any, generated: Any) -> Any:
            started = time.perf_counter()
            try:
                return clock._constrain(features, extras, scores, generated)
            finally:
                clock.seconds += time.perf_counter() - started

        def chosen(features: Any, extras: Any, tokens: Any, done: Any) -> None:
            started = time.perf_counter()
            clock.tokens += sum(1 for e, d in zip(extras, done, strict=True) if e.matcher and not d)
            try:
                clock._chosen(features, extras, tokens, done)
            finally:
                clock.seconds += time.perf_counter() - started

        hf_features.BatchFeatures.constrain = constrain  # type: ignore[method-assign]
        hf_features.BatchFeatures.chosen = chosen  # type: ignore[method-assign]


def jobs(count: int, max_new: int | list[int], schema: bool, base: int) -> list[Job]:
    """The chat prompts; ``max_new`` one budget for all, or one per prompt."""
    out = []
    for i in range(count):
        content = f"Invent film number {i} about {TOPICS[i % len(TOPICS)]}. Reply in JSON."
        budget = max_new if isinstance(max_new, int) else max_new[i]
        params = {"max_new_tokens": budget} | ({"json_schema": SCHEMA} if schema else {})
        checked = SamplingParams.from_wire(P.validate_params(params))
        out.append(Job(base + i, None, [{"role": "user", "content": content}], checked))
    return out


def run_round(engine: TransformersEngine, batch: list[Job], clock: GrammarClock) -> dict[str, Any]:
    before_s, before_t = clock.seconds, clock.tokens
    started = time.perf_counter()
    cpu_started = time.process_time()
    for job in batch:
        engine.add(job)
    done: list[Finished] = []
    while engine.pending:
        done += [e for e in engine.step() if isinstance(e, Finished)]
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    tokens = sum(e.completion_tokens for e in done)
    lengths = [e.completion_tokens for e in sorted(done, key=lambda e: e.key)]
    valid = 0
    for event in done:
        try:
            json.loads(event.text)
            valid += 1
        except ValueError:
            pass
    grammar_s = clock.seconds - before_s
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "cpu_s": cpu,
        "cpu_ms_per_token": 1000 * cpu / tokens,
        "ms_per_step_token": 1000 * wall / tokens,
        "parses_as_json": f"{valid}/{len(done)}",
        "grammar_s": grammar_s,
        "grammar_tokens": clock.tokens - before_t,
        "lengths": lengths,
    }


def compile_costs(engine: TransformersEngine) -> dict[str, float]:
    started = time.perf_counter()
    grammars = engine._grammar()
    tokenizer_s = time.perf_counter() - started
    text = P.validate_params({"json_schema": SCHEMA})["json_schema"]
    grammars._compiled.clear()
    started = time.perf_counter()
    grammars.compile(text)
    return {"tokenizer_s": tokenizer_s, "compile_s": time.perf_counter() - started}


def render(doc: dict[str, Any]) -> str:
    free, schema = doc["free"], doc["schema"]
    host = doc["host"]
    free_tps = median([r["tokens_per_s"] for r in free])
    schema_tps = median([r["tokens_per_s"] for r in schema])
    ratios = [s["tokens_per_s"] / f["tokens_per_s"] for f, s in zip(free, schema, strict=True)]
    cpu_ratios = [
        s["cpu_ms_per_token"] / f["cpu_ms_per_token"] for f, s in zip(free, schema, strict=True)
    ]
    per_token = [1e6 * r["grammar_s"] / max(1, r["grammar_tokens"]) for r in schema]
    step = [1000 * r["wall_s"] / r["tokens"] for r in schema]
    share = [r["grammar_s"] / r["wall_s"] for r in schema]
    return "\n".join(
        [
            "## Structured output",
            "",
            f"`bench/structured_output.py --rounds {doc['rounds']}` on {host['cpu']}, "
            f"{host['cores']} cores (load average at start {host['load_avg']}), commit "
            f"{host.get('git', '?')}: the transformers engine in-process on the demo model "
            f"({doc['dtype']}, {doc['threads']} threads), {doc['prompts']} chat prompts asking "
            f"for a film as JSON, greedy, one batch, in rounds of two runs (their order "
            f"alternating): under a JSON Schema (an object of 5 typed fields, one an enum; "
            f"{doc['max_new']} new tokens at most), and free text with each prompt's budget "
            "set to the length its JSON has, so that rows leave the batch at the same steps "
            "in both runs. OMP_WAIT_POLICY=PASSIVE, as a worker runs. Medians over the "
            "rounds; the ratios are taken within each round.",
            "",
            "| | tokens/s | per round | CPU ms per token | outputs that parse as JSON |",
            "|---|---:|---|---:|---|",
            f"| free text | {free_tps:.1f} | {_list(r['tokens_per_s'] for r in free)} | "
            f"{median([r['cpu_ms_per_token'] for r in free]):.1f} | "
            f"{free[-1]['parses_as_json']} |",
            f"| JSON Schema | {schema_tps:.1f} | {_list(r['tokens_per_s'] for r in schema)} | "
            f"{median([r['cpu_ms_per_token'] for r in schema]):.1f} | "
            f"{schema[-1]['parses_as_json']} |",
            "",
            f"- schema ÷ free tokens/s: **{median(ratios):.2f}** (per round {_list(ratios, 2)});"
            f" CPU per token, schema ÷ free: **{median(cpu_ratios):.2f}** (per round "
            f"{_list(cpu_ratios, 2)}): the steadier figure on a shared machine",
            f"- the grammar's cost per constrained token (mask computed by llguidance, "
            f"applied, token consumed): **{median(per_token):.0f} µs** (per round "
            f"{_list(per_token, 0)}), against {median(step):.1f} ms of wall time per generated "
            f"token of the batch: {100 * median(share):.1f} % of the run",
            f"- once per worker: llguidance's tokenizer {doc['costs']['tokenizer_s'] * 1000:.0f}"
            f" ms; once per distinct schema: compile {doc['costs']['compile_s'] * 1000:.2f} ms",
        ]
    )


def _list(values: Any, digits: int = 1) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="as a default CPU worker")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    host = machine()
    engine = TransformersEngine(None, {"threads": str(args.threads), "batch_size": "64"})
    engine.load()
    clock = GrammarClock()
    clock.install()
    costs = compile_costs(engine)
    doc: dict[str, Any] = {
        "host": host,
        "rounds": args.rounds,
        "prompts": args.prompts,
        "max_new": args.max_new,
        "threads": args.threads,
        "dtype": engine.describe()["dtype"],
        "costs": costs,
        "free": [],
        "schema": [],
    }
    run_round(engine, jobs(4, 8, True, 10_000), clock)  # warm up both paths
    for r in range(args.rounds):
        # The free run gets each prompt's JSON length as its budget: rows leave the batch
        # at the same steps in both modes, so the batch holds as many rows per step
        # (a CPU step's cost hardly depends on how many rows it holds).
        schema = run_round(engine, jobs(args.prompts, args.max_new, True, r * 2000), clock)
        doc["schema"].append(schema)
        budgets = schema["lengths"]
        doc["free"].append(
            run_round(engine, jobs(args.prompts, budgets, False, r * 2000 + 1000), clock)
        )
        logger.info("round %d: schema %s free %s", r, doc["schema"][-1], doc["free"][-1])
    block = render(doc)
    if not args.no_write:
        write_section("structured_output", block)
    print(json.dumps(doc, indent=2))
    print(block, file=sys.stderr)


if __name__ == "__main__":
    main()
