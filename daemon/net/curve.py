"""CURVE on the client socket: the daemon's key pair and the clients it lets in.

With ``curve_secret_key`` (the daemon's ``NAME.key_secret``) and
``curve_allowed_dir`` (a directory of allowed clients' ``*.key`` public keys), the
frontend becomes a CURVE server and a ZAP authenticator thread checks every
connecting client's public key against the directory. A client without an allowed
key never completes the handshake: it gets nothing at all, not even status.
SIGHUP re-reads the directory, so a key is added or revoked without a restart.

Key files come from ``exgen keygen NAME`` (ZeroMQ's certificate format).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from exgen.client import errors
from exgen.client.keys import load_pair
from exgen.daemon.config import Settings

logger = logging.getLogger("exgen.curve")


class CurveSetupError(RuntimeError):
    """CURVE settings that cannot be used; the message names the setting."""


def allowed_keys(directory: Path) -> int:
    """How many public keys the directory holds (a check, before the daemon starts)."""
    if not directory.is_dir():
        raise CurveSetupError(f"curve_allowed_dir {directory}: not a directory")
    return len(zmq.auth.load_certificates(directory))


def server_keys(settings: Settings) -> tuple[bytes, bytes, Path] | None:
    """(public, secret, allowed_dir) when CURVE is configured; None when it is not.

    Raises CurveSetupError, naming the setting, for anything unusable: the daemon
    checks this before it starts anything.
    """
    if not settings.curve_secret_key:
        if settings.curve_allowed_dir:
            raise CurveSetupError("curve_allowed_dir is set but curve_secret_key is not")
        return None
    if not settings.curve_allowed_dir:
        raise CurveSetupError("curve_secret_key is set but curve_allowed_dir is not")
    try:
        public, secret = load_pair(settings.curve_secret_key)
    except errors.BadKeyFile as exc:
        raise CurveSetupError(f"curve_secret_key {exc}") from None
    allowed_dir = Path(settings.curve_allowed_dir)
    allowed_keys(allowed_dir)
    return public, secret, allowed_dir


def secure_frontend(
    ctx: zmq.Context[Any], sock: zmq.Socket[Any], settings: Settings
) -> ThreadAuthenticator | None:
    """Make ``sock`` a CURVE server when keys are configured (call before bind)."""
    keys = server_keys(settings)
    if keys is None:
        return None
    public, secret, allowed_dir = keys
    count = allowed_keys(allowed_dir)
    if count == 0:
        logger.warning("curve: no public keys in %s: no client can connect yet", allowed_dir)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("exgen.curve.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed_dir))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    logger.info("curve: on, %d allowed client key(s) in %s", count, allowed_dir)
    return auth


def allowed_user_ids(settings: Settings) -> set[str]:
    """The allowed clients' public keys, z85 — ZMQ's User-Id of a CURVE client's messages."""
    assert settings.curve_allowed_dir is not None
    certificates = zmq.auth.load_certificates(Path(settings.curve_allowed_dir))
    return {key.decode("ascii") if isinstance(key, bytes) else str(key) for key in certificates}


def reload_allowed(auth: ThreadAuthenticator, settings: Settings) -> set[str] | None:
    """Re-read the allowed keys (SIGHUP): added keys get in, removed ones are refused —
    new connections by the authenticator, open ones by the router from their next
    message (it checks each message's User-Id against the set returned). None: the
    directory could not be read, the old keys stay."""
    assert settings.curve_allowed_dir is not None
    allowed_dir = Path(settings.curve_allowed_dir)
    try:
        count = allowed_keys(allowed_dir)
    except CurveSetupError as exc:
        logger.error("curve: keeping the old allowed keys: %s", exc)
        return None
    auth.configure_curve(domain="*", location=str(allowed_dir))
    logger.info("curve: reloaded, %d allowed client key(s) in %s", count, allowed_dir)
    return allowed_user_ids(settings)


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (both) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = (Path(p) for p in zmq.auth.create_certificates(directory, name))
    secret.chmod(0o600)  # the secret half is for its owner's eyes only
    return public, secret
