"""A Llama model directory with a real shape and random weights, made here: no download.

Decode speed depends on the shapes (layers, widths, heads, vocabulary), not on the
values, so a model with random fp16 weights times like the real one. What gets written
is what ExLlamaV2, ExLlamaV3 and transformers load unquantised: ``config.json``,
``model.safetensors`` (HF Llama tensor names), ``tokenizer.json`` (byte-level BPE),
``tokenizer_config.json`` (with a chat template) and ``generation_config.json``.

The tokenizer has exactly ``vocab_size`` entries, because a random model emits any id
of its vocabulary and every one must decode: 256 byte symbols, then merges of every
pair of symbols (the commonest characters first), then of pair + symbol, and the
special tokens last. A BPE trained on a few KB of text stops far short of 128,256
entries. The rows of the output matrix that belong to special tokens are zero, so
greedy decoding never picks EOS: every job runs to ``max_new_tokens``, the same
length on every side of a comparison.

    python bench/gpu_model.py --shape llama-3.2-1b --out /tmp/llama-1b
"""

from __future__ import annotations

import argparse
import itertools
import json
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The shapes of the real models (config.json), without their rope scaling: the
# contexts used here are short and the decode cost is the same.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # For the CPU dry run: the same architecture, small enough for a 2-core box.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}
SPECIAL_NAMES = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
BOS, EOS, EOT = SPECIAL_NAMES[0], SPECIAL_NAMES[1], SPECIAL_NAMES[4]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
WEIGHT_STD = 0.02  # the usual initializer range: activations stay finite in fp16
MARKER = "gpu_model.json"  # what was made, so a rerun on a warm machine can reuse it


def special_count(vocab_size: int) -> int:
    """Llama 3 reserves 256 ids for special tokens; small vocabularies fewer."""
    return max(len(SPECIAL_NAMES), min(256, vocab_size // 32))


# --- the tokenizer ----------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols (GPT-2's bytes-to-unicode table), indexed by byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def symbols_by_use(symbols: list[str]) -> list[str]:
    """Symbols ordered so English text merges early: space, letters, digits, the rest."""
    space = symbols[ord(" ")]
    common = [space, *"etaoinshrdlucmfwypvbgkjqxz", *string.ascii_uppercase, *string.digits]
    common += [symbols[ord(c)] for c in "\n.,'\"-?!:;()"]
    seen = dict.fromkeys(common)
    return [*seen, *(s for s in symbols if s not in seen)]


def merge_pairs(order: list[str]) -> Iterator[tuple[str, str]]:
    """Every (left, right) to merge, commonest first: symbol pairs, then pair + symbol."""
    rank = {s: i for i, s in enumerate(order)}
    pairs = sorted(itertools.product(order, order), key=lambda p: (max(rank[p[0]], rank[p[1]]), p))
    yield from pairs
    for left, right in pairs:  # then three symbols: a pair token + one symbol
        for third in order:
            yield left + right, third


def bpe_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """(vocab, merges, specials): ``vocab_size`` entries in all, specials at the end."""
    symbols = byte_symbols()
    specials = [*SPECIAL_NAMES]
    n_special = special_count(vocab_size)
    specials += [f"<|reserved_special_token_{i}|>" for i in range(n_special - len(specials))]
    regular = vocab_size - n_special
    if regular < len(symbols):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for left, right in merge_pairs(symbols_by_use(symbols)):
        if len(vocab) >= regular:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    for name in specials:
        vocab[name] = len(vocab)
    return vocab, merges, specials


def build_tokenizer(vocab_size: int) -> Any:
    """A ``tokenizers.Tokenizer``: byte-level BPE that adds BOS, as Llama 3's does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges, specials = bpe_vocab(vocab_size)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer


# --- config files -------------------------------------------------------------------------


def model_config(shape: dict[str, Any], bos: int, eos: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "initializer_range": WEIGHT_STD,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float16",
        "bos_token_id": bos,
        "eos_token_id": eos,
        **shape,
    }


def tokenizer_config(max_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }


# --- weights ----------------------------------------------------------------------------


def tensor_shapes(shape: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Llama checkpoint, by name."""
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
        }
    out["model.norm.weight"] = (h,)
    if not shape["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def random_weights(shape: dict[str, Any], first_special: int, device: str, seed: int) -> Any:
    """fp16 tensors on the CPU: normal(0, 0.02) matrices, unit norms, zero special rows."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, dims in tensor_shapes(shape).items():
        if len(dims) == 1:
            t = torch.ones(dims, dtype=torch.float16)
        else:
            t = torch.empty(dims, dtype=torch.float16, device=device)
            t.normal_(0.0, WEIGHT_STD, generator=gen)
            t = t.cpu()
        tensors[name] = t
    head = "model.embed_tokens.weight" if shape["tie_word_embeddings"] else "lm_head.weight"
    tensors[head][first_special:] = 0  # EOS (and every special) never wins a greedy step
    return tensors


def parameter_count(shape: dict[str, Any]) -> int:
    total = 0
    for dims in tensor_shapes(shape).values():
        n = 1
        for d in dims:
            n *= d
        total += n
    return total


# --- the directory ------------------------------------------------------------------------


def make_model(out: Path, shape_name: str, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Write the model directory (or reuse one made with the same shape and seed)."""
    wanted = {"shape": shape_name, "seed": seed, **SHAPES[shape_name]}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text())["made"] == wanted:
        return {**json.loads(marker.read_text()), "reused": True}
    from safetensors.torch import save_file

    started = time.monotonic()
    shape = SHAPES[shape_name]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape["vocab_size"])
    tokenizer.save(str(out / "tokenizer.json"))
    bos, eos, eot = (tokenizer.token_to_id(t) for t in (BOS, EOS, EOT))
    first_special = shape["vocab_size"] - special_count(shape["vocab_size"])
    _write_json(out / "config.json", model_config(shape, bos, eos))
    _write_json(out / "tokenizer_config.json", tokenizer_config(shape["max_position_embeddings"]))
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [eos, eot]})
    save_file(random_weights(shape, first_special, device, seed), str(out / "model.safetensors"))
    doc = {
        "made": wanted,
        "parameters": parameter_count(shape),
        "bytes": (out / "model.safetensors").stat().st_size,
        "seconds": round(time.monotonic() - started, 1),
        "device": device,
    }
    _write_json(marker, doc)
    return {**doc, "reused": False}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make_model(args.out, args.shape, args.device, args.seed), indent=2))


if __name__ == "__main__":
    main()
