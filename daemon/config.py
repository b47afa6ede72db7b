"""One Settings object: defaults < TOML file < environment (EXGEN_*) < command line.

Unknown keys in the file or the environment are refused, naming the key and where
it came from, so a misspelt setting never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path("/etc/exgen/exgen.toml")
ENV_PREFIX = "EXGEN_"
LISTEN_SCHEMES = ("ipc://", "tcp://")
DEFAULT_METRICS_HOST = "127.0.0.1"  # a port alone stays on this machine
# Environment variables of ours that are not settings (read elsewhere): the model
# store and cache, the client's keys (often exported in the same shell), tests, demo.
ENV_NOT_SETTINGS = frozenset(
    {
        "EXGEN_CONFIG",
        "EXGEN_MODELS_DIR",
        "EXGEN_CACHE_DIR",
        "EXGEN_SERVER_KEY",
        "EXGEN_CLIENT_KEY",
        "EXGEN_GPU_MODEL",
        "EXGEN_GPU_OPTS",
        "EXGEN_DEMO_WORKERS",
        "EXGEN_SLOT",
        "EXGEN_HTTP_URL",  # exgen-client batch: the HTTP gateway's address
        "EXGEN_API_KEY",  # and its key
    }
)


# How a client's waiting items are ordered: the largest max_new_tokens first (a job
# ends sooner when its long generations do not start last), or arrival order.
ORDERS = ("longest-first", "fifo")
# Where waiting items go (placement.py): to the workers holding their prompt's prefix,
# within a bounded imbalance, balanced by estimated work ("prefix"); by estimated work
# alone ("cost"); or by item count alone, the balancing before placement ("count").
PLACEMENTS = ("prefix", "cost", "count")


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
    prefetch: int = 2  # items beyond a worker's capacity it may hold (policy.prefetch_for)
    order: str = "longest-first"  # within a client's queue: ORDERS
    placement: str = "prefix"  # where waiting items go: PLACEMENTS
    prefix_key_bytes: int = 512  # bytes of a prompt's head that key its prefix (placement.py)
    affinity_slack: float = 1.0  # a prefix's waiting items (staged or prefetched), in
    #                              units of its holders' capacity, before a worker not
    #                              holding it takes some
    hedge: bool = False  # nothing waiting: idle workers run copies of stragglers (hedging.py)
    max_attempts: int = 3  # worker crashes an item may cause before it fails
    max_queue_bytes: int = 512 * 2**20  # bytes of waiting items before "busy"
    unread_budget_bytes: int = 64 * 2**20  # a client's unacknowledged results: past it,
    #                                         its items wait instead of being dispatched
    results_message_bytes: int = 2**20  # results grouped into RESULTS messages of at most this
    max_result_bytes: int = 16 * 2**20  # one result larger than this: a too_large error
    # Clients.
    client_heartbeat_s: float = 1.0  # ZMTP heartbeats and lease probes to clients (TCP)
    ipc_heartbeat_s: float = 0.1  # the same on an ipc address: no network between
    client_grace_s: float = 3.0  # unreachable this long: its work is cancelled
    model_name: str | None = None  # the served model's name (default: from the model)
    strict_model: bool = False  # an item naming another model: model_not_found
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
    # Ray mode (docs/cluster.md): workers are Ray actors anywhere in a cluster. A
    # [ray] table in the file sets these without the prefix (address = "auto").
    ray: str | None = None  # "auto" (the cluster this machine is part of) or its address
    ray_resource: str = "GPU"  # what a slot takes: GPU, or a custom resource's name
    ray_gpus_per_slot: int = 1  # units of ray_resource per slot; 0: CPU slots
    ray_cpus_per_slot: float = 1.0  # CPUs Ray reserves for each slot's actor
    ray_worker_listen: str = "tcp://0.0.0.0:5556"  # where workers connect back (CURVE)
    ray_kill_timeout_s: float = 5.0  # a killed worker's actor silent this long: node lost
    # The OpenAI-compatible HTTP gateway (daemon/gateway), a supervised process of
    # its own and an ordinary client of the router. Budgets: docs/http.md.
    http: str | None = None  # "HOST:PORT" or a port (then 127.0.0.1); None: off
    http_state_dir: str | None = None  # batches and files; None: see gateway.options
    http_api_keys_file: str | None = None  # one key a line; needed beyond loopback
    http_max_body_bytes: int = 16 * 2**20  # one interactive request's body
    http_max_file_bytes: int = 512 * 2**20  # one uploaded batch file
    http_max_inflight: int = 512  # interactive requests at once before 429
    http_request_timeout_s: float = 600.0  # an interactive request's deadline (504)
    http_batch_max_lines: int = 1_000_000  # requests in one batch file

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in dataclasses.fields(Settings)}
RAY_TABLE = "ray"  # [ray] address = ..., resource = ... → ray, ray_resource, ...


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one value to the field's type; strings come from the env."""
    kind = FIELD_TYPES[name]
    try:
        if name == "engine_opts":
            return _coerce_engine_opts(value)
        if "bool" in kind:
            return _coerce_bool(value)
        if "int" in kind and not isinstance(value, bool):
            return None if value in (None, "") and "None" in kind else _coerce_int(value)
        if "float" in kind and not isinstance(value, bool):
            return float(value)
        if "str" in kind:
            if value is None or isinstance(value, str):
                return value
            if name == "gpus" and isinstance(value, list | int) and not isinstance(value, bool):
                return _gpus_from_toml(value)
            raise TypeError(f"expected a string, not {type(value).__name__}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name} = {value!r} is not a valid value ({exc})") from None
    raise ConfigError(f"{source}: {name} = {value!r} has the wrong type")


def _coerce_int(value: Any) -> int:
    # int(2.5) would quietly be 2: a fractional number for a count is a mistake.
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("expected a whole number")
    return int(value)


def _gpus_from_toml(value: list[Any] | int) -> str:
    """``[0, 1]`` → ``"0;1"`` (two slots); ``[[0, 1], [2, 3]]`` → ``"0,1;2,3"``; ``0`` → ``"0"``."""
    if isinstance(value, int):
        return str(value)
    return ";".join(
        ",".join(str(g) for g in slot) if isinstance(slot, list) else str(slot) for slot in value
    )


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
        out = {}
        for key, item in value.items():
            if isinstance(item, dict | list):
                raise TypeError(f"engine_opts.{key}: expected a number, string or boolean")
            out[str(key)] = str(item).lower() if isinstance(item, bool) else str(item)
        return out
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
    for key, value in _flatten_ray_table(raw).items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise ConfigError(f"{source}: unknown setting {key!r}{_did_you_mean(name)}")
        out[name] = _coerce(name, value, source)
    return out


def _flatten_ray_table(raw: dict[str, Any]) -> dict[str, Any]:
    """A ``[ray]`` table's keys as the flat settings (``address`` is ``ray`` itself)."""
    table = raw.get(RAY_TABLE)
    if not isinstance(table, dict):
        return raw
    out = {k: v for k, v in raw.items() if k != RAY_TABLE}
    for key, value in table.items():
        out[RAY_TABLE if key == "address" else f"{RAY_TABLE}_{key}"] = value
    return out


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, FIELD_TYPES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
            if f"{ENV_PREFIX}LISTEN" in environ:
                continue  # the daemon's own variable is the more specific one
            name = "listen"
        if name not in FIELD_TYPES:
            raise ConfigError(f"environment: unknown setting {key}{_did_you_mean(name)}")
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
    """The first problem of ``settings`` as a ConfigError (``serve`` stops on one line)."""
    for problem in settings_problems(settings):
        raise ConfigError(problem)


def settings_problems(settings: Settings) -> Iterator[str]:
    """Every problem of ``settings`` (``exgen config check`` lists them all at once)."""
    # Imported here: both modules are light, and config stays importable on its own.
    from exgen.daemon.engines import ENGINE_NAMES
    from exgen.daemon.logs import LEVELS

    if settings.engine not in ENGINE_NAMES:
        yield f"engine = {settings.engine!r}: one of {', '.join(ENGINE_NAMES)}"
    if settings.log_level not in LEVELS:
        yield f"log_level = {settings.log_level!r}: one of {', '.join(LEVELS)}"
    if settings.listen is not None and not settings.listen.startswith(LISTEN_SCHEMES):
        yield f"listen = {settings.listen!r}: expected ipc://PATH or tcp://HOST:PORT"
    yield from _duration_problems(settings)
    if settings.metrics_listen is not None:
        yield from _problem_of(parse_metrics_listen, settings.metrics_listen)
    yield from _http_problems(settings)
    if settings.min_ready is not None and settings.min_ready < 1:
        yield "min_ready must be at least 1"
    if settings.gpus is not None and settings.workers is not None:
        yield "give either gpus or workers, not both"
    if settings.workers is not None and not 1 <= settings.workers <= 256:
        yield f"workers = {settings.workers}: must be between 1 and 256"
    if settings.max_attempts < 1:
        yield "max_attempts must be at least 1"
    if settings.prefetch < 0:
        yield "prefetch must be 0 or more"
    if settings.order not in ORDERS:
        yield f"order = {settings.order!r}: one of {', '.join(ORDERS)}"
    if settings.placement not in PLACEMENTS:
        yield f"placement = {settings.placement!r}: one of {', '.join(PLACEMENTS)}"
    if settings.prefix_key_bytes < 0:
        yield "prefix_key_bytes must be 0 or more"
    if settings.affinity_slack < 0:
        yield "affinity_slack must be 0 or more"
    if settings.max_queue < 1:
        yield "max_queue must be at least 1"
    if settings.gpus is not None:
        yield from _problem_of(parse_gpus, settings.gpus)
    yield from _budget_problems(settings)
    yield from _ray_problems(settings)


def _ray_problems(settings: Settings) -> Iterator[str]:
    if settings.ray is None:
        return
    if not settings.ray.strip():
        yield 'ray = "": give "auto" or the cluster\'s address'
    if settings.gpus is not None:
        yield (
            "gpus names this machine's GPUs; in Ray mode Ray places the slots: give "
            "workers (the number of slots) and ray_gpus_per_slot instead"
        )
    if not settings.ray_worker_listen.startswith("tcp://"):
        yield f"ray_worker_listen = {settings.ray_worker_listen!r}: expected tcp://HOST:PORT"
    if settings.ray_gpus_per_slot < 0 or settings.ray_cpus_per_slot < 0:
        yield "ray_gpus_per_slot and ray_cpus_per_slot must be 0 or more"
    if settings.ray_gpus_per_slot == 0 and settings.ray_cpus_per_slot == 0:
        yield "a slot must take something: ray_gpus_per_slot or ray_cpus_per_slot above 0"
    if not settings.ray_resource.strip():
        yield "ray_resource must name a resource (GPU, or a custom one)"
    if settings.ray_kill_timeout_s <= 0:
        yield "ray_kill_timeout_s must be more than 0"


def _budget_problems(settings: Settings) -> Iterator[str]:
    from exgen.client.protocol import MAX_MESSAGE_BYTES

    for name in ("max_queue_bytes", "unread_budget_bytes", "results_message_bytes"):
        if getattr(settings, name) < 1024:
            yield f"{name} must be at least 1024"
    if not 1024 <= settings.max_result_bytes <= MAX_MESSAGE_BYTES // 2:
        yield (
            f"max_result_bytes must be between 1024 and {MAX_MESSAGE_BYTES // 2} "
            "(half the clients' message size limit)"
        )
    for name in ("client_heartbeat_s", "ipc_heartbeat_s", "client_grace_s"):
        if getattr(settings, name) <= 0:
            yield f"{name} must be more than 0"


def _problem_of(parse: Callable[[str], Any], text: str) -> Iterator[str]:
    try:
        parse(text)
    except ConfigError as exc:
        yield str(exc)


def _duration_problems(settings: Settings) -> Iterator[str]:
    positive = (
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "progress_timeout_s",
        "flap_window_s",
    )
    for name in positive:
        if getattr(settings, name) <= 0:
            yield f"{name} must be more than 0"
    for name in ("drain_timeout_s", "restart_backoff_s", "restart_backoff_max_s"):
        if getattr(settings, name) < 0:
            yield f"{name} must be 0 or more"
    if settings.heartbeat_timeout_s <= settings.heartbeat_interval_s:
        yield "heartbeat_timeout_s must be longer than heartbeat_interval_s"
    if settings.flap_max_deaths < 1:
        yield "flap_max_deaths must be at least 1"


def file_problems(path: Path) -> tuple[Settings, list[str]]:
    """A config file on its own (no environment): its settings, and every problem in
    it at once: each bad key or value, then each rule the good values break."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        return Settings(), [f"{path}: cannot read ({exc.strerror})"]
    except tomllib.TOMLDecodeError as exc:
        return Settings(), [f"{path}: not valid TOML ({exc})"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        try:
            values.update(from_mapping({key: value}, str(path)))
        except ConfigError as exc:
            problems.append(str(exc))
    settings = Settings(**values)
    problems.extend(f"{path}: {p}" for p in settings_problems(settings))
    return settings, problems


def _http_problems(settings: Settings) -> Iterator[str]:
    if settings.http is not None:
        yield from _problem_of(lambda text: parse_host_port(text, "http"), settings.http)
    budgets = ("http_max_body_bytes", "http_max_file_bytes", "http_max_inflight")
    for name in (*budgets, "http_batch_max_lines"):
        if getattr(settings, name) < 1:
            yield f"{name} must be at least 1"
    if settings.http_request_timeout_s <= 0:
        yield "http_request_timeout_s must be more than 0"


def parse_metrics_listen(text: str) -> tuple[str, int]:
    return parse_host_port(text, "metrics_listen")


def parse_host_port(text: str, setting: str) -> tuple[str, int]:
    """``"9464"`` or ``":9464"`` → loopback; ``"0.0.0.0:9464"``, ``"[::1]:9464"`` as given."""
    spec = text.strip()
    host, port = DEFAULT_METRICS_HOST, spec
    if spec.startswith("["):
        inside, sep, port = spec[1:].partition("]:")
        host = inside if sep else ""
    elif ":" in spec:
        host, _, port = spec.rpartition(":")
        host = host or DEFAULT_METRICS_HOST
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{setting} = {text!r}: expected HOST:PORT or PORT")
    return host, int(port)


def parse_gpus(spec: str) -> list[list[int]]:
    """``"0,1,2,3"`` → four slots of one GPU; ``"0,1;2,3"`` → two slots of two;
    ``"0;0"`` → two slots sharing GPU 0 (a card with room for two replicas: each
    worker loads its own copy, so size the cache for both). A GPU twice in one slot,
    twice in the comma form (a typo more often than not), or slots that share some
    GPUs but not all, are refused."""
    if ";" in spec:
        groups = [g for g in spec.split(";") if g.strip()]
        slots = [[_gpu_index(x) for x in g.split(",") if x.strip()] for g in groups]
    else:
        slots = [[_gpu_index(x)] for x in spec.split(",") if x.strip()]
    if not slots or any(not s for s in slots):
        raise ConfigError(f"gpus = {spec!r}: no GPUs given")
    if any(len(slot) != len(set(slot)) for slot in slots):
        raise ConfigError(f"gpus = {spec!r}: a GPU appears twice in one slot")
    for a, b in itertools.combinations(slots, 2):
        if set(a) & set(b) and set(a) != set(b):
            raise ConfigError(f"gpus = {spec!r}: slots share some GPUs but not all")
    flat = [g for slot in slots for g in slot]
    if ";" not in spec and len(flat) != len(set(flat)):
        raise ConfigError(
            f"gpus = {spec!r}: a GPU appears twice; to run two slots on one card, "
            "say so with ';' (\"0;0\")"
        )
    return slots


def _gpu_index(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"gpus: {text.strip()!r} is not a GPU index") from None
    if value < 0:
        raise ConfigError(f"gpus: {value} is not a GPU index")
    return value
