"""API keys: ``Authorization: Bearer KEY``, keys from a file that SIGHUP re-reads.

The file holds one key a line; blank lines and lines starting with ``#`` are skipped.
No file: no key is asked for (allowed on loopback only, see options.preflight).
A reload that fails (file gone, unreadable, empty) keeps the keys already loaded,
so a botched edit never locks everyone out or lets everyone in.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from exgen.daemon.gateway.errors import ApiError

logger = logging.getLogger("exgen.gateway.auth")


def read_keys(path: Path) -> frozenset[str]:
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.add(key)
    if not keys:
        raise ValueError(f"{path}: no keys in it")
    return frozenset(keys)


class ApiKeys:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.keys: frozenset[str] = read_keys(self.path) if self.path else frozenset()

    @property
    def required(self) -> bool:
        return self.path is not None

    def reload(self) -> None:
        if self.path is None:
            return
        try:
            self.keys = read_keys(self.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            logger.error("API keys not reloaded, keeping %d keys: %s", len(self.keys), exc)
            return
        logger.info("API keys reloaded from %s: %d keys", self.path, len(self.keys))

    def check(self, authorization: str | None) -> None:
        """Raise a 401 unless the header carries a known key."""
        if self.path is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "Missing API key: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                kind="authentication_error",
            )
        token = given.strip().encode()
        # Compared with every key, each in constant time: no early exit to time.
        matches = [hmac.compare_digest(token, key.encode()) for key in self.keys]
        if not any(matches):
            raise ApiError(
                401,
                "Incorrect API key provided",
                code="invalid_api_key",
                kind="authentication_error",
            )
