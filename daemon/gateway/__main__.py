"""``python -m exgen.daemon.gateway --router ADDR --listen HOST:PORT --state-dir DIR …``

Runs the gateway alone (for tests and debugging) or as ``exgen serve --http``'s
supervised child (which adds ``--parent-pid``: the gateway dies with the supervisor).
The options are generated from :class:`GatewayOptions`' fields. Exit code 3: it
cannot start as configured (the keeper does not restart it then).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from exgen.daemon import policy
from exgen.daemon.gateway.options import GatewayOptions, GatewayUnusable
from exgen.daemon.logs import setup_logging

logger = logging.getLogger("exgen.gateway")

REQUIRED = ("router", "listen", "state_dir")
HELP = {
    "router": "The router's client address (ipc://PATH or tcp://HOST:PORT).",
    "listen": "HOST:PORT to serve HTTP on (a port alone: 127.0.0.1).",
    "state_dir": "The job store: batches, files, per-line state.",
    "api_keys_file": "File of API keys, one a line (SIGHUP re-reads it).",
}


def _options(func: Callable[..., Any]) -> Callable[..., Any]:
    for f in reversed(dataclasses.fields(GatewayOptions)):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            func = click.option(flag, is_flag=True, help=HELP.get(f.name))(func)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        required = f.name in REQUIRED
        default = None if required else f.default
        func = click.option(
            flag, type=kind, required=required, default=default, help=HELP.get(f.name)
        )(func)
    return func


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.option("--parent-pid", type=int, help="Die with this process (set by exgen serve).")
def main(parent_pid: int | None, **fields: Any) -> None:
    """The OpenAI-compatible HTTP gateway of an exgen daemon."""
    options = GatewayOptions(**fields)
    setup_logging(options.log_level, prefix=f"gateway pid {os.getpid()}")
    if parent_pid is not None:
        from exgen.daemon.procs import die_with_parent

        die_with_parent(parent_pid)
    sys.exit(serve(options))


def serve(options: GatewayOptions) -> int:
    import uvicorn

    from exgen.daemon.gateway.app import create_app

    try:
        options.preflight()
        # Uploads spool next to where they are kept, not in a small /tmp.
        spool = Path(options.state_dir) / "tmp"
        spool.mkdir(exist_ok=True)
        tempfile.tempdir = str(spool)
        app = create_app(options)
    except (GatewayUnusable, OSError) as exc:
        logger.error("cannot start: %s", exc)
        return policy.EXIT_BOOT_ERROR
    host, port = options.host_port
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    signal.signal(signal.SIGHUP, lambda *_: app.state.gateway.keys.reload())
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again with
    # the handlers it found: these make that a no-op, so a commanded stop exits 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    logger.info("listening on http://%s:%d (router %s)", host, port, options.router)
    server.run()
    if not server.started:
        return policy.EXIT_BOOT_ERROR
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    main()
