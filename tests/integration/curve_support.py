"""A real daemon on loopback TCP with CURVE keys, for the access tests: key pairs made
by `exgen keygen`, an allow-list directory holding the public keys of some of them."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from exgen.client import Client, CurveKeys
from tests.conftest import EXGEN, RunningDaemon
from tests.netutil import free_port


def keygen(directory: Path, name: str) -> None:
    subprocess.run([*EXGEN, "keygen", name, "--dir", str(directory)], check=True, timeout=30)


def start_curve_daemon(
    daemon_factory: Callable[..., RunningDaemon],
    tmp_path: Path,
    *args: str,
    allowed: Sequence[str] = ("alice",),
    strangers: Sequence[str] = (),
) -> tuple[RunningDaemon, Path]:
    """`exgen serve *args` on a free loopback port with CURVE, ready; and the directory
    of the key pairs (``server``, every name of ``allowed`` and ``strangers``). Only the
    ``allowed`` keys are in the daemon's allow-list (``tmp_path/allowed``); the daemon's
    ``client()`` speaks with the first of them."""
    keys, allow_dir = tmp_path / "keys", tmp_path / "allowed"
    allow_dir.mkdir()
    for name in ("server", *allowed, *strangers):
        keygen(keys, name)
    for name in allowed:
        (allow_dir / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    daemon = daemon_factory(
        *args,
        "--curve-secret-key", str(keys / "server.key_secret"),
        "--curve-allowed-dir", str(allow_dir),
        listen=f"tcp://127.0.0.1:{free_port()}",
        ready=False,
    )  # fmt: skip
    own = CurveKeys.from_files(keys / "server.key", keys / f"{allowed[0]}.key_secret")
    daemon.client = lambda **kw: Client(daemon.address, curve=own, **kw)  # type: ignore[method-assign]
    daemon.wait_ready()
    return daemon, keys
