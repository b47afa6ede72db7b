"""The router as the gateway sees it: one shared AsyncClient, and the latest status.

Every interactive request and every batch line goes through ``Upstream.client``, one
:class:`~exgen.client.AsyncClient`: its calls multiplex on one socket (measured in
bench/RESULTS.md: faster than a pool of clients), interactive ones at the default
priority and batch lines at ``priority="batch"``, so the router dispatches a chat
request before any waiting batch line although both come from this one client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from exgen.client import AsyncClient, errors
from exgen.client.client import workers_ready

logger = logging.getLogger("exgen.gateway.upstream")

# Items out at the router per call: a batch keeps this many lines there, enough to
# keep every GPU fed; an interactive request has one.
WINDOW = 2048
# The router answers pings every second: this long without a word, it is gone, and
# what waits on it fails (a 503; a batch pass resumes later).
SILENCE_TIMEOUT_S = 30.0
STATUS_EVERY_S = 0.5
STATUS_TIMEOUT_S = 5.0


class Upstream:
    def __init__(self, address: str, name: str = "exgen gateway") -> None:
        self.address = address
        self.client = AsyncClient(address, timeout=SILENCE_TIMEOUT_S, window=WINDOW, name=name)
        self.status: dict[str, Any] = {}
        self.status_at = 0.0  # monotonic time of the last good status
        self.status_error = "no status from the daemon yet"

    @property
    def model(self) -> str:
        return str(self.status.get("model") or self.client.model or "exgen")

    @property
    def ready(self) -> bool:
        fresh = time.monotonic() - self.status_at < STATUS_TIMEOUT_S
        return fresh and workers_ready(self.status, 1) and not self.status.get("draining")

    async def refresh_status(self) -> None:
        try:
            self.status = await asyncio.wait_for(self.client.status(), STATUS_TIMEOUT_S)
            self.status_at = time.monotonic()
        except TimeoutError:
            self.status_error = (
                f"the exgen daemon does not answer (no status in {STATUS_TIMEOUT_S:g}s)"
            )
        except errors.ExgenError as exc:
            self.status_error = f"the exgen daemon does not answer ({exc})"

    async def keep_status_fresh(self) -> None:
        while True:
            await self.refresh_status()
            await asyncio.sleep(STATUS_EVERY_S)

    def why_not_ready(self) -> str:
        if time.monotonic() - self.status_at >= STATUS_TIMEOUT_S:
            return self.status_error
        if self.status.get("draining"):
            return "the exgen daemon is shutting down"
        return "no exgen worker is ready yet (models still loading, or every worker failed)"

    def close(self) -> None:
        self.client.close()
