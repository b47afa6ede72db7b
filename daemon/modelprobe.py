"""``exgen models inspect PATH``: what a model is and what serving it takes.

Reads only metadata — config.json, safetensors headers, the GGUF header — never the
weights, and imports neither torch nor any engine library, so it answers in a second
on any machine. The GPU memory figure is an estimate (weights + KV cache for the
given cache size; activations and scratch buffers come on top).

:func:`choose_engine` is engine ``auto``: it picks by format.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from exgen.daemon.engines.base import EngineUnavailable

log = logging.getLogger(__name__)

FORMAT_EXL2 = "exl2"
FORMAT_EXL3 = "exl3"
FORMAT_HF = "safetensors"  # a Hugging Face directory with unquantised safetensors
FORMAT_HF_BIN = "pytorch-bin"
FORMAT_GGUF = "gguf"
FORMAT_UNKNOWN = "unknown"

FORMAT_NAMES = {
    FORMAT_EXL2: "EXL2",
    FORMAT_EXL3: "EXL3",
    FORMAT_HF: "HF safetensors",
    FORMAT_HF_BIN: "HF PyTorch .bin",
    FORMAT_GGUF: "GGUF",
    FORMAT_UNKNOWN: "unknown",
}
# Bytes per KV-cache element for each cache type (quantised caches add a few percent
# of scales on top).
CACHE_BYTES = {"fp16": 2.0, "q8": 1.0, "q6": 0.75, "q4": 0.5}
DEFAULT_CACHE_TOKENS = 32768
# Quantised tensors of EXL2 (tensor-name suffixes): all but q_weight/q_invperm are
# per-group metadata, not parameters.
_EXL2_META = (".q_scale", ".q_scale_max", ".q_groups", ".q_perm", ".q_invperm")
_EXL3_META = (".su", ".sv", ".suh", ".svh", ".mcg", ".mul1")
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length")


class ModelInspectError(ValueError):
    """The path is not something we can inspect (missing, unreadable, not a model)."""


@dataclass(slots=True)
class ModelInfo:
    path: str
    format: str
    size_bytes: int
    architecture: str | None = None
    bits_per_weight: float | None = None
    head_bits: float | None = None
    quant_method: str | None = None
    parameters: int | None = None
    context_length: int | None = None
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    cache_tokens: int = DEFAULT_CACHE_TOKENS
    cache_type: str = "fp16"
    weights_gpu_bytes: int | None = None
    kv_cache_bytes: int | None = None
    engines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_bytes_estimate(self) -> int | None:
        if self.weights_gpu_bytes is None or self.kv_cache_bytes is None:
            return None
        return self.weights_gpu_bytes + self.kv_cache_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["format_name"] = FORMAT_NAMES.get(self.format, self.format)
        out["gpu_bytes_estimate"] = self.gpu_bytes_estimate
        return out


# --- entry points ------------------------------------------------------------------------


def inspect_model(
    path: str | os.PathLike[str], cache_tokens: int = DEFAULT_CACHE_TOKENS, cache_type: str = "fp16"
) -> ModelInfo:
    """Facts about the model at ``path`` (a model directory or a .gguf file)."""
    if cache_type not in CACHE_BYTES:
        raise ModelInspectError(
            f"cache type {cache_type!r}: choose one of {', '.join(CACHE_BYTES)}"
        )
    if cache_tokens < 1:
        raise ModelInspectError("cache_tokens must be at least 1")
    target = Path(path).expanduser()
    if not target.exists():
        raise ModelInspectError(f"{target}: no such file or directory")
    gguf_file = _gguf_file(target)
    if gguf_file is not None:
        info = _inspect_gguf(gguf_file)
    elif target.is_dir():
        info = _inspect_directory(target)
    else:
        raise ModelInspectError(f"{target}: not a model directory or a .gguf file")
    info.cache_tokens, info.cache_type = cache_tokens, cache_type
    info.kv_cache_bytes = kv_cache_bytes(info, cache_tokens, cache_type)
    info.engines, engine_notes = _engines_for(info)
    info.notes.extend(engine_notes)
    return info


def choose_engine(path: str | os.PathLike[str] | None) -> str:
    """Engine ``auto``: the engine for this model's format, or EngineUnavailable
    saying what the model needs and what this machine lacks."""
    if path is None:
        return "transformers"  # the embedded demo model
    try:
        info = inspect_model(path)
    except ModelInspectError as exc:
        raise EngineUnavailable(f"engine auto: {exc}") from None
    if info.format in (FORMAT_EXL2, FORMAT_EXL3):
        library = "exllamav2" if info.format == FORMAT_EXL2 else "exllamav3"
        missing = _missing_for_exllama(library)
        if missing:
            raise EngineUnavailable(
                f"engine auto: {path} is an {FORMAT_NAMES[info.format]} model, served only by "
                f"{library}, and {missing}"
            )
        return library
    if info.quant_method == "gptq" and not _missing_for_exllama("exllamav2"):
        return "exllamav2"
    if info.format in (FORMAT_HF, FORMAT_HF_BIN, FORMAT_GGUF):
        return "transformers"
    raise EngineUnavailable(
        f"engine auto: cannot tell what {path} is (no config.json with weights, no .gguf)"
    )


def inspect_command_output(
    path: str,
    cache_tokens: int = DEFAULT_CACHE_TOKENS,
    as_json: bool = False,
    cache_type: str = "fp16",
) -> str:
    """What ``exgen models inspect`` prints (raises ModelInspectError for a bad path)."""
    info = inspect_model(path, cache_tokens=cache_tokens, cache_type=cache_type)
    if as_json:
        return json.dumps(info.to_dict(), indent=2, sort_keys=True)
    return format_info(info)


def format_info(info: ModelInfo) -> str:
    rows: list[tuple[str, str]] = [("model", info.path), ("format", _format_line(info))]
    if info.architecture:
        rows.append(("architecture", info.architecture))
    rows.append(("parameters", _count(info.parameters)))
    rows.append(("size on disk", _gib(info.size_bytes)))
    rows.append(
        ("context length", f"{info.context_length} tokens" if info.context_length else "unknown")
    )
    rows.append(("GPU memory", _memory_line(info)))
    rows.append(("engines", ", ".join(info.engines) if info.engines else "none known"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.extend(f"note: {note}" for note in info.notes)
    return "\n".join(lines)


# --- estimates -------------------------------------------------------------------------


def kv_cache_bytes(info: ModelInfo, tokens: int, cache_type: str) -> int | None:
    """layers × kv_heads × head_dim × 2 (K and V) × bytes per element × tokens."""
    if not (info.layers and info.kv_heads and info.head_dim):
        return None
    per_token = info.layers * info.kv_heads * info.head_dim * 2 * CACHE_BYTES[cache_type]
    return int(per_token * tokens)


def _memory_line(info: ModelInfo) -> str:
    total = info.gpu_bytes_estimate
    if total is None:
        return "unknown (no layer geometry or weight size found)"
    return (
        f"about {_gib(total)} per replica (estimate): weights {_gib(info.weights_gpu_bytes or 0)}"
        f" + KV cache {_gib(info.kv_cache_bytes or 0)} for {info.cache_tokens} tokens"
        f" ({info.cache_type}; {info.layers} layers × {info.kv_heads} KV heads × "
        f"{info.head_dim} head dim); activations come on top"
    )


def _format_line(info: ModelInfo) -> str:
    line = FORMAT_NAMES.get(info.format, info.format)
    if info.bits_per_weight is not None:
        line += f", {info.bits_per_weight:g} bits per weight"
        if info.head_bits is not None:
            line += f" (head {info.head_bits:g})"
    elif info.quant_method:
        line += f", quantised ({info.quant_method})"
    return line


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _count(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,})"
    return str(n)


# --- directories -----------------------------------------------------------------------


def _inspect_directory(directory: Path) -> ModelInfo:
    config = read_json(directory / "config.json")
    headers = _safetensors_headers(directory)
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    fmt, qcfg = _directory_format(directory, config, headers)
    info = ModelInfo(path=str(directory), format=fmt, size_bytes=size)
    if not config and fmt == FORMAT_UNKNOWN:
        raise ModelInspectError(f"{directory}: no config.json, safetensors or .gguf found")
    _fill_from_config(info, config)
    info.quant_method = (
        qcfg.get("quant_method") if isinstance(qcfg.get("quant_method"), str) else None
    )
    if fmt in (FORMAT_EXL2, FORMAT_EXL3):
        info.bits_per_weight = _number(qcfg.get("bits"))
        info.head_bits = _number(qcfg.get("head_bits"))
    if headers:
        info.parameters = _parameter_count(headers, fmt)
        info.weights_gpu_bytes = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    elif fmt == FORMAT_HF_BIN:
        info.weights_gpu_bytes = sum(p.stat().st_size for p in directory.glob("*.bin"))
        info.notes.append("parameter count needs safetensors headers (.bin files are pickles)")
    return info


def _directory_format(
    directory: Path, config: dict[str, Any], headers: dict[str, dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    qcfg = config.get("quantization_config")
    qcfg = qcfg if isinstance(qcfg, dict) else {}
    method = qcfg.get("quant_method")
    # Both converters sign config.json with quant_method; older EXL2 conversions
    # (and output without --compile_full) lack it, so tensor names decide then.
    if method in (FORMAT_EXL2, FORMAT_EXL3):
        return str(method), qcfg
    if any(name.endswith(".q_weight") for name in headers):
        return FORMAT_EXL2, qcfg
    if any(name.endswith(".trellis") for name in headers):
        return FORMAT_EXL3, qcfg
    if headers:
        return FORMAT_HF, qcfg
    if any(directory.glob("pytorch_model*.bin")):
        return FORMAT_HF_BIN, qcfg
    return FORMAT_UNKNOWN, qcfg


def _fill_from_config(info: ModelInfo, config: dict[str, Any]) -> None:
    archs = config.get("architectures")
    if isinstance(archs, list) and archs:
        info.architecture = str(archs[0])
    # Multimodal wrappers keep the language model's numbers under text_config.
    text = config.get("text_config")
    merged = {**config, **text} if isinstance(text, dict) else config
    info.context_length = next(
        (int(merged[k]) for k in _CONTEXT_KEYS if isinstance(merged.get(k), int)), None
    )
    layers, heads = merged.get("num_hidden_layers"), merged.get("num_attention_heads")
    kv_heads = merged.get("num_key_value_heads", heads)
    head_dim = merged.get("head_dim")
    hidden = merged.get("hidden_size")
    if (
        not isinstance(head_dim, int)
        and isinstance(hidden, int)
        and isinstance(heads, int)
        and heads
    ):
        head_dim = hidden // heads
    info.layers = layers if isinstance(layers, int) else None
    info.kv_heads = kv_heads if isinstance(kv_heads, int) else None
    info.head_dim = head_dim if isinstance(head_dim, int) else None


def _parameter_count(headers: dict[str, dict[str, Any]], fmt: str) -> int:
    """Parameters from tensor shapes. Quantised linears are counted as the matrix they
    stand for: EXL2 as len(q_invperm) × q_weight columns, EXL3 as 16×16 trellis tiles."""
    total = 0
    for name, entry in headers.items():
        shape = [int(x) for x in entry.get("shape", [])]
        if fmt == FORMAT_EXL2 and name.endswith(".q_weight"):
            prefix = name[: -len(".q_weight")]
            # q_weight packs the rows; the permutation has one entry per real row.
            perm = headers.get(prefix + ".q_invperm") or headers.get(prefix + ".q_perm")
            total += int(perm["shape"][0]) * shape[1] if perm else _product(shape)
        elif fmt == FORMAT_EXL2 and name.endswith(_EXL2_META):
            continue
        elif fmt == FORMAT_EXL3 and name.endswith(".trellis"):
            total += shape[0] * 16 * shape[1] * 16
        elif fmt == FORMAT_EXL3 and name.endswith(_EXL3_META):
            continue
        else:
            total += _product(shape)
    return total


def _product(shape: list[int]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


def _safetensors_headers(directory: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's {dtype, shape, data_offsets} from the safetensors headers."""
    tensors: dict[str, dict[str, Any]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(read_safetensors_header(file))
    return tensors


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file starts with a little-endian u64 length and that many bytes
    of JSON describing the tensors; the weights follow and are not read."""
    with file.open("rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise ModelInspectError(f"{file}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw_len)
        if length > 100 * 2**20:
            raise ModelInspectError(f"{file}: implausible safetensors header ({length} bytes)")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            raise ModelInspectError(f"{file}: safetensors header is not JSON") from None
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


# --- GGUF --------------------------------------------------------------------------------


def _gguf_file(target: Path) -> Path | None:
    if target.is_file() and target.suffix == ".gguf":
        return target
    if target.is_dir() and not (target / "config.json").exists():
        found = sorted(target.glob("*.gguf"))
        if found:
            return found[0]
    return None


def _inspect_gguf(file: Path) -> ModelInfo:
    fields, tensor_counts = read_gguf_metadata(file)
    arch = str(fields.get("general.architecture", "")) or None
    info = ModelInfo(path=str(file), format=FORMAT_GGUF, size_bytes=file.stat().st_size)
    info.architecture = arch
    info.parameters = sum(tensor_counts)

    def arch_int(key: str) -> int | None:
        value = fields.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int) else None

    info.context_length = arch_int("context_length")
    info.layers = arch_int("block_count")
    heads = arch_int("attention.head_count")
    info.kv_heads = arch_int("attention.head_count_kv") or heads
    embed = arch_int("embedding_length")
    info.head_dim = arch_int("attention.key_length") or (
        embed // heads if embed and heads else None
    )
    # transformers dequantises GGUF weights when it loads them: 2 bytes a parameter
    # in fp16/bf16 on a GPU, not the file's size.
    info.weights_gpu_bytes = info.parameters * 2
    info.notes.append(
        "GGUF weights are dequantised on load (transformers): "
        "the estimate counts 2 bytes per parameter"
    )
    return info


def read_gguf_metadata(file: Path) -> tuple[dict[str, Any], list[int]]:
    """(scalar metadata, element count of each tensor).

    Parsed here first: the ``gguf`` package's reader builds an object for every
    vocabulary entry and takes seconds on a 100 MB file where this takes a tenth of
    one. The reader is the fallback for what this parser does not know (a new
    version or value type).
    """
    try:
        return parse_gguf_header(file)
    except (ModelInspectError, struct.error, UnicodeDecodeError) as exc:
        if importlib.util.find_spec("gguf") is None:
            raise ModelInspectError(f"{file}: {exc}") from None
        log.debug("GGUF header parse failed on %s (%s); trying the gguf reader", file, exc)
    try:
        return _gguf_with_reader(file)
    except Exception as exc:  # the reader raises several unrelated types on bad files
        raise ModelInspectError(f"{file}: not a readable GGUF file ({exc})") from None


def _gguf_with_reader(file: Path) -> tuple[dict[str, Any], list[int]]:
    import gguf

    reader = gguf.GGUFReader(str(file))
    fields: dict[str, Any] = {}
    for name, entry in reader.fields.items():
        if name.startswith("tokenizer.ggml."):
            continue  # vocabularies: large and not needed here
        value = entry.contents()
        if isinstance(value, (int, float, str, bool)):
            fields[name] = value
    return fields, [int(t.n_elements) for t in reader.tensors]


_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def parse_gguf_header(file: Path) -> tuple[dict[str, Any], list[int]]:
    """GGUF v2/v3: magic, version, tensor count, metadata count, metadata key/values,
    then per tensor its name, dims, type and offset (the data itself is not read)."""
    with file.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelInspectError(f"{file}: not a GGUF file (bad magic)")
        (version,) = struct.unpack("<I", fh.read(4))
        if version < 2:
            raise ModelInspectError(f"{file}: GGUF version {version} is not supported")
        n_tensors, n_kv = struct.unpack("<QQ", fh.read(16))
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _gguf_string(fh)
            (kind,) = struct.unpack("<I", fh.read(4))
            value = _gguf_value(fh, kind)
            if not isinstance(value, list):
                fields[key] = value
        counts = []
        for _ in range(n_tensors):
            _gguf_string(fh)
            (n_dims,) = struct.unpack("<I", fh.read(4))
            dims = struct.unpack(f"<{n_dims}Q", fh.read(8 * n_dims))
            fh.read(4 + 8)  # type, offset
            counts.append(_product(list(dims)))
    return fields, counts


def _gguf_string(fh: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", fh.read(8))
    return fh.read(length).decode("utf-8", errors="replace")


def _gguf_value(fh: BinaryIO, kind: int) -> Any:
    if kind in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[kind]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if kind == _GGUF_STRING:
        return _gguf_string(fh)
    if kind == _GGUF_ARRAY:
        item_kind, count = struct.unpack("<IQ", fh.read(12))
        return [_gguf_value(fh, item_kind) for _ in range(count)]
    raise ModelInspectError(f"unknown GGUF value type {kind}")


# --- engines ---------------------------------------------------------------------------


def _engines_for(info: ModelInfo) -> tuple[list[str], list[str]]:
    """Engines that can serve this format, preferred first, and notes on them."""
    if info.format == FORMAT_EXL2:
        return ["exllamav2"], ["EXL2 needs a CUDA GPU and the exllamav2 package"]
    if info.format == FORMAT_EXL3:
        return ["exllamav3"], ["EXL3 needs a CUDA GPU and the exllamav3 package"]
    if info.format == FORMAT_HF and info.quant_method == "gptq":
        return ["exllamav2", "transformers"], [
            "GPTQ: exllamav2 loads it directly; transformers needs a GPTQ backend (gptqmodel)"
        ]
    if info.format == FORMAT_HF and info.quant_method:
        return ["transformers"], [f"quantised with {info.quant_method}: transformers only"]
    if info.format == FORMAT_HF:
        return ["transformers", "exllamav2", "exllamav3"], [
            "exllamav2 and exllamav3 also load unquantised HF weights (as fp16) for the "
            "architectures they support; engine auto picks transformers"
        ]
    if info.format in (FORMAT_HF_BIN, FORMAT_GGUF):
        return ["transformers"], []
    return [], []


def _missing_for_exllama(library: str) -> str:
    """'' when ``library`` is installed and an NVIDIA GPU is visible, else what is missing.
    Checked without importing it: importing exllamav2 compiles CUDA code."""
    if importlib.util.find_spec(library) is None:
        return f"{library} is not installed (pip install exgen[{library}])"
    if not nvidia_gpu_visible():
        return "no NVIDIA GPU is visible here"
    return ""


def nvidia_gpu_visible() -> bool:
    """An NVIDIA GPU this process may use, judged without CUDA or torch: the driver's
    device list, narrowed by CUDA_VISIBLE_DEVICES when that is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model directory; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelInspectError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
