"""One Settings object: defaults < TOML file < environment (EXGEN_*) < command line.

Unknown keys in the file or the environment are refused, naming the key and where
it came from, so a misspelt setting never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

DEFAULT_CONFIG_FILE = Path("/etc/exgen/exgen.toml")
ENV_PREFIX = "EXGEN_"
# Environment variables of ours that are not settings (read elsewhere).
ENV_NOT_SETTINGS = frozenset({"EXGEN_MODELS_DIR", "EXGEN_GPU_MODEL", "EXGEN_CONFIG"})


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and its source."""


@dataclass(slots=True)
class Settings:
    listen: str | None = None  # None: the local default (an ipc socket)
    engine: str = "auto"
    model: str | None = None  # None: the embedded demo model
    gpus: str | None = None  # "0,1,2,3" four slots; "0,1;2,3" two slots of two
    workers: int | None = None  # slots without GPUs
    engine_opts: dict[str, str] = field(default_factory=dict)
    # Keys for CURVE, required on a non-loopback TCP address unless insecure.
    curve_secret_key: str | None = None  # path to the server's secret key file
    curve_allowed_dir: str | None = None  # directory of allowed clients' public keys
    insecure: bool = False
    # Limits.
    max_queue: int = 200_000  # items waiting in the router before "busy"
    prefetch: int = 2  # items beyond a worker's capacity it may hold
    max_attempts: int = 3  # worker crashes an item may cause before it fails
    # Lifecycle.
    drain_timeout_s: float = 60.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 10.0
    progress_timeout_s: float = 300.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    flap_window_s: float = 60.0
    flap_max_deaths: int = 5
    min_ready: int | None = None  # slots ready before READY=1 (None: all)
    metrics_listen: str | None = None  # "127.0.0.1:9464"; None: off
    log_level: str = "info"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one value to the field's type; strings come from the env."""
    kind = FIELD_TYPES[name]
    try:
        if name == "engine_opts":
            return _coerce_engine_opts(value)
        if "bool" in kind:
            return _coerce_bool(value)
        if "int" in kind and not isinstance(value, bool):
            return None if value in (None, "") and "None" in kind else int(value)
        if "float" in kind and not isinstance(value, bool):
            return float(value)
        if "str" in kind:
            if value is None or isinstance(value, str):
                return value
            if name == "gpus" and isinstance(value, list):
                return ";".join(
                    ",".join(str(g) for g in slot) if isinstance(slot, list) else str(slot)
                    for slot in value
                )
            raise TypeError(type(value).__name__)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name} = {value!r} is not a valid value ({exc})") from None
    raise ConfigError(f"{source}: {name} = {value!r} has the wrong type")


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _coerce_engine_opts(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str):
        return parse_engine_opts(value.split(",") if value else [])
    raise TypeError("expected a table of KEY = VALUE")


def parse_engine_opts(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["token_ms=5", "capacity=8"]`` → ``{"token_ms": "5", "capacity": "8"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"engine option {pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def from_mapping(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Checked settings from a file's table; unknown keys are refused by name."""
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        out[name] = _coerce(name, value, source)
    return out


def from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return from_mapping(raw, str(path))


def from_environ(environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    out = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ENV_NOT_SETTINGS:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name == "address":  # the client's variable doubles as the default listen address
            name = "listen"
        if name not in FIELD_TYPES:
            raise ConfigError(f"environment: unknown setting {key}")
        out[name] = _coerce(name, value, f"environment {key}")
    return out


def load_settings(
    config_file: Path | None,
    cli: dict[str, Any],
    environ: dict[str, str] | os._Environ[str] | None = None,
) -> Settings:
    """File < environment < command line. ``cli`` holds only options actually given."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = config_file or (Path(environ["EXGEN_CONFIG"]) if environ.get("EXGEN_CONFIG") else None)
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        merged.update(from_file(path))
    merged.update(from_environ(environ))
    for name, value in cli.items():
        if name == "engine_opts":
            merged["engine_opts"] = {**merged.get("engine_opts", {}), **value}
        else:
            merged[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    settings = Settings(**merged)
    check_settings(settings)
    return settings


def check_settings(settings: Settings) -> None:
    if settings.gpus is not None and settings.workers is not None:
        raise ConfigError("give either gpus or workers, not both")
    if settings.workers is not None and not 1 <= settings.workers <= 256:
        raise ConfigError(f"workers = {settings.workers}: must be between 1 and 256")
    if settings.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    if settings.prefetch < 0:
        raise ConfigError("prefetch must be 0 or more")
    if settings.max_queue < 1:
        raise ConfigError("max_queue must be at least 1")
    if settings.gpus is not None:
        parse_gpus(settings.gpus)


def parse_gpus(spec: str) -> list[list[int]]:
    """``"0,1,2,3"`` → four slots of one GPU; ``"0,1;2,3"`` → two slots of two."""
    if ";" in spec:
        groups = [g for g in spec.split(";") if g.strip()]
        slots = [[_gpu_index(x) for x in g.split(",") if x.strip()] for g in groups]
    else:
        slots = [[_gpu_index(x)] for x in spec.split(",") if x.strip()]
    flat = [g for slot in slots for g in slot]
    if not slots or any(not s for s in slots):
        raise ConfigError(f"gpus = {spec!r}: no GPUs given")
    if len(flat) != len(set(flat)):
        raise ConfigError(f"gpus = {spec!r}: a GPU appears in more than one slot")
    return slots


def _gpu_index(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"gpus: {text.strip()!r} is not a GPU index") from None
    if value < 0:
        raise ConfigError(f"gpus: {value} is not a GPU index")
    return value
