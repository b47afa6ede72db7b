"""CURVE keys for talking to a daemon that listens beyond this machine.

Key files are ZeroMQ's certificate format (``zmq.auth.create_certificates``, which
``exgen keygen NAME`` wraps): ``NAME.key`` holds the public key, ``NAME.key_secret``
holds both. A client needs the server's public key and its own secret key file; the
daemon needs its own secret key file and a directory of the public keys it lets in.

    Client(address, curve=CurveKeys.from_files("server.key", "alice.key_secret"))

or set ``EXGEN_SERVER_KEY`` and ``EXGEN_CLIENT_KEY`` to the two paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from exgen.client.errors import BadKeyFile

ENV_SERVER_KEY = "EXGEN_SERVER_KEY"
ENV_CLIENT_KEY = "EXGEN_CLIENT_KEY"


def load_public(path: str | Path) -> bytes:
    """The public key in a key file (either half of a pair)."""
    public, _ = _load(path)
    return public


def load_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``*.key_secret`` file."""
    public, secret = _load(path)
    if secret is None:
        raise BadKeyFile(f"{path}: holds no secret key (give the NAME.key_secret file)")
    return public, secret


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise BadKeyFile(f"{path}: not a readable key file ({exc})") from None
    if not public:
        raise BadKeyFile(f"{path}: no public key in it")
    return public, secret


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """What a client needs: the server's public key and its own key pair."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_key: str | Path, client_key: str | Path) -> CurveKeys:
        public, secret = load_pair(client_key)
        return cls(load_public(server_key), public, secret)

    @classmethod
    def from_env(cls, environ: Any = None) -> CurveKeys | None:
        """From $EXGEN_SERVER_KEY and $EXGEN_CLIENT_KEY; None when neither is set."""
        env = os.environ if environ is None else environ
        server, client = env.get(ENV_SERVER_KEY), env.get(ENV_CLIENT_KEY)
        if not server and not client:
            return None
        if not (server and client):
            raise BadKeyFile(f"set both {ENV_SERVER_KEY} and {ENV_CLIENT_KEY}, or neither")
        return cls.from_files(server, client)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret
