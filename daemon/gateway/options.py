"""The gateway's options: one dataclass, built from the daemon's Settings by the keeper
and from the command line by ``python -m exgen.daemon.gateway`` (whose options are
generated from these fields, so the two cannot drift)."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from exgen.daemon.config import Settings, parse_host_port
from exgen.daemon.gateway.store import StateDirInUse, lock_exclusively
from exgen.daemon.net.sockets import is_loopback


class GatewayUnusable(ValueError):
    """The gateway cannot start as configured; the message says why, in one line."""


@dataclass(slots=True)
class GatewayOptions:
    router: str  # the router's client address (ipc:// or tcp://)
    listen: str  # HOST:PORT, or a port (then 127.0.0.1)
    state_dir: str  # the job store: batches, files, per-line state
    api_keys_file: str | None = None
    max_body_bytes: int = 16 * 2**20
    max_file_bytes: int = 512 * 2**20
    max_inflight: int = 512
    request_timeout_s: float = 600.0
    batch_max_lines: int = 1_000_000
    log_level: str = "info"

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen, "http")

    @classmethod
    def from_settings(cls, settings: Settings, router: str) -> GatewayOptions:
        assert settings.http is not None
        return cls(
            router=local_address(router),
            listen=settings.http,
            state_dir=settings.http_state_dir or str(default_state_dir()),
            api_keys_file=settings.http_api_keys_file,
            max_body_bytes=settings.http_max_body_bytes,
            max_file_bytes=settings.http_max_file_bytes,
            max_inflight=settings.http_max_inflight,
            request_timeout_s=settings.http_request_timeout_s,
            batch_max_lines=settings.http_batch_max_lines,
            log_level=settings.log_level,
        )

    def to_argv(self) -> list[str]:
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv += [flag] if value else []
            elif value is not None:
                argv += [flag, str(value)]
        return argv

    def preflight(self) -> None:
        """What would stop the gateway from starting, found before anything starts."""
        host, port = self.host_port
        if not is_loopback(host) and not self.api_keys_file:
            # Beyond loopback every request must carry a key: refuse to start otherwise.
            raise GatewayUnusable(
                f"http = {self.listen!r} is reachable from other machines: give "
                "http_api_keys_file (one API key a line) so that requests need a key"
            )
        if self.api_keys_file is not None and not os.access(self.api_keys_file, os.R_OK):
            raise GatewayUnusable(f"http_api_keys_file {self.api_keys_file}: cannot read it")
        try:
            Path(self.state_dir).mkdir(parents=True, exist_ok=True)
            lock_exclusively(Path(self.state_dir) / "lock").close()
        except StateDirInUse as exc:
            raise GatewayUnusable(f"http_state_dir: {exc}") from None
        except OSError as exc:
            raise GatewayUnusable(f"http_state_dir {self.state_dir}: {exc.strerror}") from None
        try:
            probe = socket.create_server((host, port))
        except OSError as exc:
            raise GatewayUnusable(f"http = {self.listen!r}: {exc.strerror or exc}") from None
        probe.close()


def default_state_dir() -> Path:
    """systemd's StateDirectory (``$STATE_DIRECTORY``), else the XDG state home."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0]) / "http"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "exgen" / "http"


def local_address(listen: str) -> str:
    """The router's address as a client on this machine dials it (0.0.0.0 → 127.0.0.1)."""
    if not listen.startswith("tcp://"):
        return listen
    host, _, port = listen[len("tcp://") :].rpartition(":")
    wildcard = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}
    return f"tcp://{wildcard.get(host, host)}:{port}"
