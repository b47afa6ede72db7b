"""``exgen``: the daemon side's command line (serve, models, config, keygen)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from exgen.daemon import config as cfg
from exgen.daemon import gcpolicy
from exgen.daemon.engines import ENGINE_NAMES
from exgen.daemon.logs import LEVELS, setup_logging

logger = logging.getLogger("exgen.cli")


class CliError(click.ClickException):
    """A one-line error for the user; exit status 2."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="exgen", prog_name="exgen")
def main() -> None:
    """exgen: push large volumes of LLM prompts through every GPU of a machine."""


# --- serve ------------------------------------------------------------------------------


@main.command()
@click.option("--engine", type=click.Choice(ENGINE_NAMES), help="Engine (default: auto).")
@click.option(
    "--model", help="Model directory, GGUF file or name under models/ (default: the demo model)."
)
@click.option(
    "--gpus", help='GPU slots: "0,1,2,3" = four slots; "0,1;2,3" = two slots of two GPUs.'
)
@click.option("--workers", type=int, help="Number of CPU worker slots (machines without GPUs).")
@click.option(
    "--engine-opt",
    "engine_opt",
    multiple=True,
    metavar="KEY=VALUE",
    help="Engine option (repeatable).",
)
@click.option(
    "--listen", help="Address for clients (default: $EXGEN_ADDRESS, else a local ipc socket)."
)
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option(
    "--curve-secret-key",
    type=click.Path(dir_okay=False),
    help="The daemon's secret key file (NAME.key_secret from `exgen keygen`): clients must "
    "then authenticate with CURVE.",
)
@click.option(
    "--curve-allowed-dir",
    type=click.Path(file_okay=False),
    help="Directory of the public keys (*.key) of clients allowed in; SIGHUP re-reads it.",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Allow a non-loopback TCP address without CURVE keys.",
)
@click.option(
    "--drain-timeout",
    "drain_timeout_s",
    type=float,
    help="Seconds to finish in-flight work on SIGTERM.",
)
@click.option(
    "--order",
    type=click.Choice(cfg.ORDERS),
    help="Order of one client's waiting prompts: largest max_new_tokens first, ties in "
    "arrival order (default), or arrival order only.",
)
@click.option(
    "--placement",
    type=click.Choice(cfg.PLACEMENTS),
    help="Where waiting prompts go: to the workers holding their prefix, balanced by "
    "estimated work (default); by estimated work alone; or by prompt count alone.",
)
@click.option(
    "--hedge/--no-hedge",
    default=None,
    help="Once no prompt waits, let idle workers run copies of the slowest running "
    "prompts; the first answer is delivered (default: off).",
)
@click.option(
    "--max-attempts", type=int, help="Worker crashes an item may cause before it fails (default 3)."
)
@click.option(
    "--heartbeat-timeout",
    "heartbeat_timeout_s",
    type=float,
    help="Seconds without a heartbeat before a worker is killed as frozen (default 10).",
)
@click.option(
    "--progress-timeout",
    "progress_timeout_s",
    type=float,
    help="Seconds a worker with work may go without progress before it is killed as hung "
    "(default 300).",
)
@click.option("--metrics", "metrics_listen", help="Prometheus endpoint HOST:PORT (default: off).")
@click.option(
    "--http",
    metavar="HOST:PORT",
    help="Also serve the OpenAI-compatible HTTP API and Batch API there (docs/http.md).",
)
@click.option(
    "--http-state-dir", metavar="DIR", help="The HTTP gateway's job store (batches, files)."
)
@click.option("--log-level", type=click.Choice(LEVELS), help="Log level (default: info).")
@click.option(
    "--ray",
    is_flag=False,
    flag_value="auto",
    metavar="[ADDRESS]",
    help="Run the workers as Ray actors across a cluster: the one this machine has "
    "joined (`--ray` alone: auto), or ADDRESS. Needs exgen[ray]; see docs/cluster.md.",
)
@click.option(
    "--ray-resource", help="In Ray mode, what a slot takes: GPU (default) or a custom resource."
)
@click.option(
    "--ray-gpus-per-slot", type=int, help="In Ray mode, units of that resource per slot (1)."
)
def serve(config_file: Path | None, engine_opt: tuple[str, ...], **options: Any) -> None:
    """Start the supervisor, one worker per GPU (or slot), and the router."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        if engine_opt:
            given["engine_opts"] = cfg.parse_engine_opts(engine_opt)
        settings = cfg.load_settings(config_file, given)
    except cfg.ConfigError as exc:
        raise CliError(str(exc)) from None
    setup_logging(settings.log_level)
    sys.exit(run_daemon(settings))


def run_daemon(settings: cfg.Settings) -> int:
    from exgen.client.client import user_address
    from exgen.daemon.net.curve import CurveSetupError, server_keys
    from exgen.daemon.net.listen import ListenError
    from exgen.daemon.server import Daemon
    from exgen.daemon.supervisor.supervisor import plan_slots

    listen = settings.listen or user_address()
    check_listen_security(listen, settings)
    try:
        server_keys(settings)  # unusable keys: one line now, before anything starts
    except CurveSetupError as exc:
        raise CliError(str(exc)) from None
    check_http_gateway(settings, listen)  # an unusable --http setting: one line, now
    engine, model = resolve_engine_and_model(settings)
    if settings.ray is not None:
        slots, where = ray_slots(settings), f" on the Ray cluster ({settings.ray})"
    else:
        gpu_slots = cfg.parse_gpus(settings.gpus) if settings.gpus else None
        if gpu_slots is None and settings.workers is None and engine != "synthetic":
            gpus = detect_gpus()
            gpu_slots = [[g] for g in gpus] or None
            if gpu_slots is None:
                settings.workers = default_cpu_workers_for(model)
        slots, where = plan_slots(settings, gpu_slots), "" if gpu_slots else " on CPU"
    try:
        daemon = Daemon(settings, listen, slots, engine, model)
    except (ListenError, CurveSetupError) as exc:
        raise CliError(str(exc)) from None  # one line, and nothing logged before it
    logger.info("engine %s, model %s, %d slot(s)%s", engine, model or "-", len(slots), where)
    gcpolicy.tune()
    return daemon.run()


def ray_slots(settings: cfg.Settings) -> list[Any]:
    """Join the Ray cluster and plan the slots there (Ray is imported only here)."""
    try:
        from exgen.daemon.supervisor import launch_ray
    except ImportError as exc:
        raise CliError(
            f"Ray mode needs Ray: pip install 'exgen[ray]' ({exc.name or exc} is missing)"
        ) from None
    assert settings.ray is not None
    try:
        launch_ray.connect(settings.ray)
        return launch_ray.plan_ray_slots(settings)
    except launch_ray.RayModeError as exc:
        raise CliError(str(exc)) from None


def default_cpu_workers_for(model: str | None) -> int:
    """`exgen serve` on a machine without GPUs: one single-threaded worker per core,
    as many as the memory holds copies of the model (cpu_layout.py)."""
    from exgen.daemon import cpu_layout

    size = cpu_layout.model_memory_bytes(Path(model)) if model else None
    available = cpu_layout.available_memory_bytes()
    return cpu_layout.default_cpu_workers(cpu_layout.usable_cores(), available, size)


def check_http_gateway(settings: cfg.Settings, listen: str) -> None:
    if settings.http is None:
        return
    from exgen.daemon.gateway.options import GatewayOptions, GatewayUnusable

    try:
        GatewayOptions.from_settings(settings, listen).preflight()
    except GatewayUnusable as exc:
        raise CliError(str(exc)) from None


def resolve_engine_and_model(settings: cfg.Settings) -> tuple[str, str | None]:
    """The concrete engine and model path, with one-line errors for what is missing."""
    if settings.engine == "synthetic":
        return "synthetic", settings.model
    from exgen.daemon import modelstore

    try:
        path = modelstore.resolve_model(settings.model, modelstore.models_dir())
    except modelstore.ModelNotFound as exc:
        raise CliError(str(exc)) from None
    engine = settings.engine
    if engine == "auto":
        engine = choose_engine(path)
    return engine, str(path)


def choose_engine(path: Path) -> str:
    """Engine ``auto`` for this model, or one line saying why none can serve it."""
    from exgen.daemon.engines.base import EngineUnavailable

    try:
        from exgen.daemon import modelprobe
    except ImportError:
        return "transformers"
    try:
        return modelprobe.choose_engine(path)
    except (EngineUnavailable, ValueError) as exc:
        raise CliError(str(exc)) from None


def detect_gpus() -> list[int]:
    """Visible NVIDIA GPUs, without importing torch in the supervisor."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    listed = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return list(range(len(listed)))


def check_listen_security(listen: str, settings: cfg.Settings) -> None:
    """A TCP address beyond loopback needs CURVE keys, unless --insecure."""
    from exgen.daemon.net.listen import is_local

    if is_local(listen) or settings.insecure:
        return
    if not (settings.curve_secret_key and settings.curve_allowed_dir):
        raise CliError(
            f"{listen} is reachable from other machines: give curve_secret_key and "
            "curve_allowed_dir (see `exgen keygen`), or --insecure to allow anyone"
        )


# --- keygen -----------------------------------------------------------------------------


@main.command()
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to write the key files.",
)
def keygen(name: str, directory: Path) -> None:
    """Write a CURVE key pair: NAME.key (public, to share) and NAME.key_secret (private).

    For the daemon: `exgen serve --curve-secret-key server.key_secret --curve-allowed-dir
    clients/`. For each client: copy its NAME.key into the daemon's clients/ directory,
    and give it the daemon's server.key: `exgen-client --server-key server.key
    --client-key NAME.key_secret` (or $EXGEN_SERVER_KEY and $EXGEN_CLIENT_KEY).
    """
    from exgen.daemon.net.curve import keygen as write_keys

    if not name or "/" in name or name.startswith("."):
        raise CliError(f"key name {name!r}: use a plain file name")
    for suffix in (".key", ".key_secret"):
        if (directory / f"{name}{suffix}").exists():
            raise CliError(f"{directory / (name + suffix)} already exists; not overwriting it")
    public, secret = write_keys(directory, name)
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it private)")


# --- models -----------------------------------------------------------------------------


@main.group()
def models() -> None:
    """The model store."""


@models.command("list")
def models_list() -> None:
    """The demo model and every model under the models directory."""
    from exgen.daemon import modelstore

    directory = modelstore.models_dir()
    for entry in modelstore.list_models(directory):
        size = f"{entry.size_bytes / 2**20:,.0f} MiB"
        click.echo(f"{entry.name:<40} {entry.kind:<12} {size:>10}  {entry.path}")
    click.echo(f"(models directory: {directory})", err=True)


@models.command("inspect")
@click.argument("model")
@click.option(
    "--cache-tokens",
    type=int,
    default=8192,
    show_default=True,
    help="KV cache size to estimate for.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_inspect(model: str, cache_tokens: int, as_json: bool) -> None:
    """Format, size, context length, GPU memory estimate and engines for a model:
    MODEL is a path, or a name as `exgen models list` prints it."""
    from exgen.daemon import modelprobe, modelstore

    path = Path(model).expanduser()
    if not path.exists():  # not a path: a name in the store (or the demo model's)
        try:
            path = modelstore.resolve_model(model, modelstore.models_dir())
        except modelstore.ModelNotFound as exc:
            raise CliError(str(exc)) from None
    try:
        click.echo(modelprobe.inspect_command_output(str(path), cache_tokens, as_json))
    except ValueError as exc:
        raise CliError(str(exc)) from None


# --- config -----------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Configuration files."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Check a config file as `serve` would take it: every unknown key, bad value and
    engine option that `serve` would refuse, all at once (exit 2 if any)."""
    settings, problems = cfg.file_problems(file)
    problems += [f"{file}: {p}" for p in engine_option_problems(settings)]
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        n = len(problems)
        raise CliError(f"{file}: {n} problem{'s' if n != 1 else ''}")
    click.echo(f"{file}: ok ({len(cfg.from_file(file))} settings)")


# Where each engine declares its options (take_options specs). The test suite holds
# this table to engines.ENGINES, so a new engine cannot be forgotten here.
ENGINE_OPTION_SPECS = {
    "synthetic": ("exgen.daemon.engines.synthetic", "OPTIONS"),
    "transformers": ("exgen.daemon.engines.hf", "OPTIONS"),
    "exllamav2": ("exgen.daemon.engines.exl_common", "OPTION_SPEC"),
    "exllamav3": ("exgen.daemon.engines.exl_common", "OPTION_SPEC"),
}


def engine_option_problems(settings: cfg.Settings) -> list[str]:
    """What the engine `serve` would run makes of ``engine_opts``: every unknown
    option in one line, then each value it refuses."""
    import importlib

    from exgen.daemon.engines.base import EngineOptionError, take_options

    if settings.engine not in ENGINE_NAMES:
        return []  # said already
    try:
        engine, _ = resolve_engine_and_model(settings)
    except CliError as exc:
        return [str(exc.message)]
    module, name = ENGINE_OPTION_SPECS[engine]
    spec = getattr(importlib.import_module(module), name)
    options = settings.engine_opts
    unknown = sorted(set(options) - set(spec))
    problems = []
    if unknown:
        problems.append(
            f"engine {engine}: unknown engine option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(spec))})"
        )
    for key in sorted(set(options) & set(spec)):
        try:
            take_options({key: options[key]}, spec, engine)
        except EngineOptionError as exc:
            problems.append(str(exc))
    return problems


if __name__ == "__main__":
    main()
