"""The grammar libraries considered for structured output, measured on the demo model's
tokenizer: setup, schema compile, per-token mask cost, and whether token sequences of
valid instances are accepted. Writes its section of bench/RESULTS.md, prints the JSON.

Each library is run in its own process from its own directory (they are not project
dependencies; only llguidance is), installed there without dependencies so none
brings another torch, e.g.:

    pip download --no-deps xgrammar==0.2.8 apache-tvm-ffi -d wheels/
    pip install --no-deps --target /tmp/libs/xg wheels/xgrammar-*.whl wheels/apache_tvm_ffi-*
    cd bench && ../.venv/bin/python grammar_libraries.py --lib llguidance= \\
        --lib xgrammar=/tmp/libs/xg --lib formatron=/tmp/libs/fmt \\
        --lib lm-format-enforcer=/tmp/libs/lmfe --lib outlines-core=/tmp/libs/oc

(``NAME=`` with no directory: the project's environment.) The mask is what a decode
loop needs each step: the set of allowed tokens, computed after each consumed token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers import write_section

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "label": {"enum": ["positive", "negative", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "score", "active", "label", "tags"],
    "additionalProperties": False,
}
INSTANCES = [
    {"name": "Alice Smith", "age": 34, "score": 0.75, "active": True, "label": "positive",
     "tags": ["a", "b"]},
    {"name": "Bob", "age": 7, "score": -12.5, "active": False, "label": "neutral", "tags": []},
    {"name": "Carol from the river stone garden", "age": 101, "score": 3, "active": True,
     "label": "negative", "tags": ["quiet", "gentle", "ancient"]},
]  # fmt: skip
VOCAB = 49152  # the demo model's


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


class Probe:
    """One library: a fresh state per instance, its mask (as a membership test), and
    consuming a token. Each library module below fills these in."""

    def __init__(self, hf: Any, eos: int) -> None:
        self.hf, self.eos = hf, eos
        self.setup_s = self.compile_s = 0.0
        self.notes = ""

    def new_state(self) -> Any: ...

    def allowed(self, state: Any) -> Callable[[int], bool]: ...

    def consume(self, state: Any, token: int) -> None: ...


def bit_test(words: Any) -> Callable[[int], bool]:
    return lambda t: bool((int(words[t // 32]) >> (t % 32)) & 1)


class LLGuidance(Probe):
    def __init__(self, hf: Any, eos: int, tokenizer_json: str) -> None:
        super().__init__(hf, eos)
        import llguidance
        import llguidance.numpy as lnp

        self.llg = llguidance
        self.tok, self.setup_s = timed(
            lambda: llguidance.LLTokenizer(tokenizer_json, eos_token=eos)
        )
        self.grammar, self.compile_s = timed(
            lambda: llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        )
        self.words = lnp.allocate_token_bitmask(1, self.tok.vocab_size)
        self.lnp = lnp
        self.notes = "lazy: the grammar is compiled as it is used"

    def new_state(self) -> Any:
        return self.llg.LLMatcher(self.tok, self.grammar)

    def allowed(self, state: Any) -> Callable[[int], bool]:
        self.lnp.fill_next_token_bitmask(state, self.words)
        return bit_test(self.words[0])

    def consume(self, state: Any, token: int) -> None:
        state.consume_token(token)


class XGrammar(Probe):
    def __init__(self, hf: Any, eos: int) -> None:
        super().__init__(hf, eos)
        import xgrammar as xgr

        self.xgr = xgr
        info, self.setup_s = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB))
        compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.compiled, self.compile_s = timed(
            lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
        )
        self.words = xgr.allocate_token_bitmask(1, VOCAB)
        self.notes = "pulls triton (286 MB) on Linux x86_64"

    def new_state(self) -> Any:
        return self.xgr.GrammarMatcher(self.compiled)

    def allowed(self, state: Any) -> Callable[[int], bool]:
        state.fill_next_token_bitmask(self.words)
        return bit_test(self.words[0])

    def consume(self, state: Any, token: int) -> None:
        state.accept_token(token)


class Formatron(Probe):
    def __init__(self, hf: Any, eos: int) -> None:
        super().__init__(hf, eos)
        from formatron.formatter import FormatterBuilder
        from formatron.integrations.transformers import create_engine_vocabulary
        from formatron.schemas.json_schema import create_schema

        vocab, self.setup_s = timed(lambda: create_engine_vocabulary(hf))
        schema = {**SCHEMA, "$id": "https://example.com/x.json"}

        def build() -> Any:
            builder = FormatterBuilder()
            builder.append_line(f"{builder.json(create_schema(schema), capture_name='json')}")
            return builder.build(vocab, lambda tokens: hf.decode(tokens))

        self.build = build
        _, self.compile_s = timed(build)

    def new_state(self) -> Any:
        return self.build()

    def allowed(self, state: Any) -> Callable[[int], bool]:
        state.compute_allowed_tokens()
        allowed = set(state.get_allowed_tokens_since_last_computation())
        return allowed.__contains__

    def consume(self, state: Any, token: int) -> None:
        state.accept_token(token)


class LMFormatEnforcer(Probe):
    def __init__(self, hf: Any, eos: int) -> None:
        super().__init__(hf, eos)
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer
        from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

        def data() -> Any:
            # Its transformers integration imports a module transformers 5 no longer
            # has; this is the data it would build.
            zero = hf.encode("0")[-1]
            special = set(hf.all_special_ids)
            regular = []
            for i in range(VOCAB):
                if i not in special:
                    after0, alone = hf.decode([zero, i])[1:], hf.decode([i])
                    regular.append((i, after0, len(after0) > len(alone)))
            decode = lambda tokens: hf.decode(tokens).rstrip("\ufffd")  # noqa: E731
            return TokenEnforcerTokenizerData(regular, decode, eos, False, VOCAB)

        self.data, self.setup_s = timed(data)
        self.make = lambda: [TokenEnforcer(self.data, JsonSchemaParser(SCHEMA)), []]
        _, self.compile_s = timed(self.make)
        self.notes = "its transformers integration fails to import under transformers 5"

    def new_state(self) -> Any:
        return self.make()

    def allowed(self, state: Any) -> Callable[[int], bool]:
        return set(state[0].get_allowed_tokens(state[1]).allowed_tokens).__contains__

    def consume(self, state: Any, token: int) -> None:
        state[1].append(token)


class OutlinesCore(Probe):
    def __init__(self, hf: Any, eos: int) -> None:
        super().__init__(hf, eos)
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        decoder = {v: k for k, v in _bytes_to_unicode().items()}
        vocab: dict[bytes, list[int]] = {}
        for text, i in hf.get_vocab().items():
            if i != eos and i not in hf.all_special_ids:
                vocab.setdefault(bytes(decoder[c] for c in text), []).append(i)
        voc, self.setup_s = timed(lambda: Vocabulary(eos, vocab))
        regex = build_regex_from_schema(json.dumps(SCHEMA))
        self.index, self.compile_s = timed(lambda: Index(regex, voc))
        self.guide = Guide
        self.notes = "a regex's DFA over the vocabulary, built ahead (grows with the schema)"

    def new_state(self) -> Any:
        return self.guide(self.index)

    def allowed(self, state: Any) -> Callable[[int], bool]:
        return set(state.get_tokens()).__contains__

    def consume(self, state: Any, token: int) -> None:
        state.advance(token)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (its byte-level BPE spells tokens so)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def measure(name: str, tokenizer_dir: Path) -> dict[str, Any]:
    """In this process: one library's numbers."""
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = int(hf.eos_token_id)
    tokenizer_json = (tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    probes: dict[str, Callable[[], Probe]] = {
        "llguidance": lambda: LLGuidance(hf, eos, tokenizer_json),
        "xgrammar": lambda: XGrammar(hf, eos),
        "formatron": lambda: Formatron(hf, eos),
        "lm-format-enforcer": lambda: LMFormatEnforcer(hf, eos),
        "outlines-core": lambda: OutlinesCore(hf, eos),
    }
    try:
        probe = probes[name]()
    except Exception as exc:  # an import or setup failure is the finding
        return {"lib": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    per_token: list[float] = []
    accepted = 0
    for instance in INSTANCES:
        text = json.dumps(instance)
        state = probe.new_state()
        for token in [*hf(text, add_special_tokens=False)["input_ids"], eos]:
            started = time.perf_counter()
            allowed = probe.allowed(state)
            per_token.append(time.perf_counter() - started)
            if not allowed(token):
                break
            if token == eos:
                accepted += 1
                break
            try:
                probe.consume(state, token)
            except Exception:
                break
    per_token.sort()
    return {
        "lib": name,
        "setup_s": probe.setup_s,
        "compile_s": probe.compile_s,
        "mask_us_median": 1e6 * statistics.median(per_token),
        "mask_us_p90": 1e6 * per_token[int(0.9 * len(per_token))],
        "accepted": f"{accepted}/{len(INSTANCES)}",
        "notes": probe.notes,
    }


def render(results: list[dict[str, Any]], versions: dict[str, str]) -> str:
    lines = [
        "## Grammar libraries for structured output",
        "",
        "`bench/grammar_libraries.py`: each library in its own process on the demo model's "
        "tokenizer (49,152 tokens), a schema of six typed fields with an enum; "
        "the mask of allowed tokens computed before each token of three valid instances "
        "(and their EOS), which must all be allowed.",
        "",
        "| library | version | tokenizer setup | schema compile | mask per token, median (p90) "
        "| valid instances accepted | notes |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for r in results:
        version = versions.get(r["lib"], "?")
        if "error" in r:
            lines.append(f"| {r['lib']} | {version} | - | - | - | - | fails: {r['error']} |")
            continue
        lines.append(
            f"| {r['lib']} | {version} | {r['setup_s'] * 1000:.0f} ms | "
            f"{r['compile_s'] * 1000:.1f} ms | {r['mask_us_median']:.1f} µs "
            f"({r['mask_us_p90']:.0f} µs) | {r['accepted']} | {r['notes']} |"
        )
    return "\n".join([*lines, "", CHOICE])


CHOICE = (
    "exgen uses llguidance (daemon/engines/grammar.py). xgrammar's masks are faster, but "
    "both cost microseconds next to a decoding step of 5-100 ms here, and llguidance has "
    "no dependencies (xgrammar requires torch, transformers and triton), reads the "
    "model's tokenizer.json alone (the exllama engines need no transformers), compiles "
    "lazily (a bad or huge schema costs its sender little; its parser limits bound each "
    "step), and its packed int32 mask is what ExLlamaV3's samplers take natively (the "
    "library ships an llguidance filter of its own). formatron (TabbyAPI's choice) does "
    "not import with pydantic 2.14; lm-format-enforcer is pure Python, ~60x slower per "
    "token, and its transformers integration does not import under transformers 5; "
    "outlines-core builds a regex DFA over the whole vocabulary ahead of time, which "
    "grows with the schema, and covers less of JSON Schema."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--tokenizer-dir", type=Path, help="default: the converted demo model")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's library
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tokenizer_dir = args.tokenizer_dir or _demo_tokenizer_dir()
    if args.one:
        print(json.dumps(measure(args.one, tokenizer_dir)))
        return
    results, versions = [], {}
    for spec in args.lib or ["llguidance="]:
        name, _, where = spec.partition("=")
        env = {**os.environ, "PYTHONPATH": where} if where else dict(os.environ)
        cmd = [sys.executable, __file__, "--one", name, "--tokenizer-dir", str(tokenizer_dir)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        lines = run.stdout.strip().splitlines()
        results.append(
            json.loads(lines[-1]) if lines else {"lib": name, "error": run.stderr[-300:]}
        )
        versions[name] = _version(name, where)
    block = render(results, versions)
    if not args.no_write:
        write_section("grammar_libraries", block)
    print(json.dumps(results, indent=2))
    print(block, file=sys.stderr)


def _version(name: str, where: str) -> str:
    dist = name.replace("-", "_")
    folders = Path(where).glob(f"{dist}-*.dist-info") if where else []
    for folder in folders:
        return folder.name.removeprefix(f"{dist}-").removesuffix(".dist-info")
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _demo_tokenizer_dir() -> Path:
    """The demo model's tokenizer, as the transformers engine converted it."""
    from exgen.daemon import modelstore

    gguf = modelstore.default_model_path()
    found = sorted(modelstore.cache_dir().glob(f"converted/{gguf.stem}-*/tokenizer.json"))
    if not found:
        raise SystemExit("run the transformers engine once first (make demo) to convert the model")
    return found[-1].parent


if __name__ == "__main__":
    main()
