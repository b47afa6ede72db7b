"""What every ``exgen-client`` command shares: the connection options, opening a
:class:`~exgen.client.Client` with them, sampling options, the library's errors mapped
to exit codes, and the signals that stop a run."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.client import DEFAULT_CONNECT_TIMEOUT_S, Client
from exgen.client.exits import EXIT_CONNECT, EXIT_FAILED, EXIT_USAGE, fail
from exgen.client.keys import CurveKeys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE)  # exit 128 + the signal

F = TypeVar("F", bound=Callable[..., Any])


class Stopped(BaseException):
    """A signal that ends the run (SIGTERM, SIGHUP, SIGPIPE); like KeyboardInterrupt,
    it unwinds through the client's iterators, which cancel their work."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Turn STOP_SIGNALS into Stopped while the body runs (main thread only). A SIGHUP
    ignored by whoever started the client (``nohup``) stays ignored: the user asked
    for the run to outlive the terminal. (SIGPIPE is ignored by Python itself at
    start, so it is not inherited intent and is always taken.)"""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    wanted = [
        s
        for s in STOP_SIGNALS
        if not (s == signal.SIGHUP and signal.getsignal(s) is signal.SIG_IGN)
    ]
    try:
        previous = {s: signal.signal(s, stop) for s in wanted}
    except ValueError:  # not the main thread: leave the handlers alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- shared options --------------------------------------------------------------


def connection_options(func: F) -> F:
    func = click.option(
        "--client-key",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember,
        help="This client's secret key file, for a daemon that requires CURVE "
        "(default: $EXGEN_CLIENT_KEY; see `exgen keygen`).",
    )(func)
    func = click.option(
        "--server-key",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember,
        help="The daemon's public key file (default: $EXGEN_SERVER_KEY).",
    )(func)
    func = click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_CONNECT_TIMEOUT_S,
        show_default=True,
        expose_value=False,
        callback=_remember,
        help="Seconds a connection may take to be made (a TCP address that never answers).",
    )(func)
    func = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=30.0,
        show_default=True,
        help="Seconds the daemon may stay silent before giving up.",
    )(func)
    return click.option(
        "--connect",
        "address",
        metavar="ADDR",
        default=None,
        help="Daemon address (default: $EXGEN_ADDRESS, else the local socket).",
    )(func)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta[f"exgen.{param.name}"] = value


def command_name() -> str:
    """This run as the daemon's status shows it: `exgen-client ARGS...`."""
    return " ".join(["exgen-client", *sys.argv[1:]])


def open_client(address: str, timeout: float) -> Client:
    """A Client with the options' CURVE keys (else the environment's) and connect timeout."""
    meta = click.get_current_context().meta
    server_key, client_key = meta.get("exgen.server_key"), meta.get("exgen.client_key")
    connect_timeout = meta.get("exgen.connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
    curve = None
    try:
        if server_key is not None or client_key is not None:
            if server_key is None or client_key is None:
                raise click.UsageError("--server-key and --client-key go together")
            curve = CurveKeys.from_files(server_key, client_key)
        return Client(
            address,
            timeout=timeout,
            connect_timeout=connect_timeout,
            curve=curve,
            name=command_name(),
        )
    except errors.BadKeyFile as exc:
        fail(str(exc), EXIT_USAGE)
    except errors.ConnectionFailed as exc:  # a malformed address
        fail(str(exc), EXIT_USAGE)


def sampling_options(default_tokens: str | None = None) -> Callable[[F], F]:
    """Sampling params; each becomes a default that a batch line's own value overrides."""
    tokens_help = default_tokens or f"Default {P.DEFAULT_PARAMS['max_new_tokens']}."

    def add(func: F) -> F:
        options = [
            click.option(
                "--max-new-tokens", "--max-tokens", "max_new_tokens", type=int, help=tokens_help
            ),
            click.option("--temperature", type=float, help="0 = greedy (the default)."),
            click.option("--top-p", type=float),
            click.option("--top-k", type=int),
            click.option("--min-p", type=float),
            click.option("--repetition-penalty", type=float),
            click.option("--seed", type=int),
            click.option("--stop", multiple=True, metavar="S", help="Stop string (repeatable)."),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return add


def sampling_params(values: dict[str, Any]) -> dict[str, Any]:
    """The given sampling options, checked now so a bad value is a usage error."""
    raw = {name: values[name] for name in P.PARAM_NAMES if values.get(name) not in (None, ())}
    if "stop" in raw:
        raw["stop"] = list(raw["stop"])
    try:
        return P.validate_params(raw, "params")
    except P.ValidationError as exc:
        option = "--" + exc.field.removeprefix("params.").split("[")[0].replace("_", "-")
        raise click.BadParameter(exc.message, param_hint=option) from None


START_HINT = (
    "Is it running? Start one with `exgen serve`, or point --connect "
    "(or $EXGEN_ADDRESS) at a running daemon."
)


@contextlib.contextmanager
def daemon_errors(address: str, timeout: float) -> Iterator[None]:
    """Map the library's errors to a message and an exit code."""
    try:
        yield
    except errors.ConnectTimeout as exc:
        fail(f"{exc}.\n{START_HINT}", EXIT_CONNECT)
    except errors.Timeout:
        fail(
            f"could not connect to the exgen daemon at {address}: no answer within "
            f"{timeout:g}s.\n{START_HINT}",
            EXIT_CONNECT,
        )
    except errors.UnsafeSocket as exc:
        fail(str(exc), EXIT_CONNECT)
    except errors.ConnectionFailed as exc:
        hint = "" if "permission denied" in str(exc) else f"\n{START_HINT}"
        fail(f"could not connect to the exgen daemon at {address}: {exc}{hint}", EXIT_CONNECT)
    except errors.ProtocolMismatch as exc:
        fail(f"the daemon at {address} speaks another protocol: {exc}", EXIT_FAILED)
    except errors.RequestFailed as exc:
        fail(f"the daemon refused the request: {exc}", EXIT_FAILED)
