"""The router as the gateway sees it: AsyncClients, and the latest status document.

``Upstream.client()`` is the one place that hands out a client. Today's AsyncClient
runs one conversation at a time, so interactive requests borrow one from a small
pool; once AsyncClient multiplexes, ``client()`` yields one shared instance (a
one-line change). Batch runners each hold a client of their own for the whole run.

``RouterClient`` adds the two things the gateway needs that AsyncClient's public
methods do not offer yet: a submit priority (batch lines go in the ``batch`` lane)
and a stream that ends with its Result (finish reason and token counts for the last
chunk and ``usage``). It is the only code here that knows the client's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from typing import Any

from exgen.client import errors
from exgen.client.client import AsyncClient, Result, _Session, _stream_tail, workers_ready

logger = logging.getLogger("exgen.gateway.upstream")

POOL_SIZE = 64  # interactive requests served at once while AsyncClient serialises
STATUS_EVERY_S = 0.5
STATUS_TIMEOUT_S = 5.0


class _PrioritySession(_Session):
    def __init__(self, *args: Any, priority: str) -> None:
        super().__init__(*args)
        self.priority = priority

    def next_submit(self, now: float) -> dict[str, Any] | None:
        body = super().next_submit(now)
        if body is not None and self.priority != "interactive":
            body["priority"] = self.priority
        return body


class RouterClient(AsyncClient):
    async def results(
        self, items: Iterable[Mapping[str, Any]], priority: str = "interactive"
    ) -> AsyncGenerator[Result, None]:
        """iter_results with a priority; items carry their own validated params."""
        session = _PrioritySession(items, {}, self.window, False, priority=priority)
        async with self._lock:
            async for kind, value in self._drive(session):
                if kind == "result":
                    yield value

    async def stream_item(self, item: Mapping[str, Any]) -> AsyncGenerator[str | Result, None]:
        """Text chunks of one item as they come, then its Result (the whole text)."""
        session = _Session([item], {}, 1, True)
        sent = ""
        async with self._lock:
            async for kind, value in self._drive(session):
                if kind == "chunk":
                    sent += value[1]
                    yield value[1]
                    continue
                if value.ok:  # the final text is the truth (a stop string may cut it)
                    tail = _stream_tail(value, sent)
                    if tail:
                        yield tail
                yield value


class Upstream:
    def __init__(self, address: str, timeout_s: float | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._free: asyncio.LifoQueue[RouterClient] = asyncio.LifoQueue()
        for _ in range(POOL_SIZE):
            self._free.put_nowait(self.new_client())
        self.status: dict[str, Any] = {}
        self.status_at = 0.0  # monotonic time of the last good status
        self.status_error = "no status from the daemon yet"
        self._status_client = self.new_client()
        self._status_client.timeout = STATUS_TIMEOUT_S

    def new_client(self, window: int = 4096) -> RouterClient:
        return RouterClient(self.address, timeout=self.timeout_s, window=window)

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[RouterClient]:
        """A client for one interactive request."""
        client = await self._free.get()
        try:
            yield client
        finally:
            self._free.put_nowait(client)

    # --- the status document, refreshed in the background ------------------------------

    @property
    def model(self) -> str:
        return str(self.status.get("model") or "exgen")

    @property
    def ready(self) -> bool:
        fresh = time.monotonic() - self.status_at < STATUS_TIMEOUT_S
        return fresh and workers_ready(self.status, 1) and not self.status.get("draining")

    async def refresh_status(self) -> None:
        try:
            self.status = await self._status_client.status()
            self.status_at = time.monotonic()
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
        while not self._free.empty():
            self._free.get_nowait().close()
        self._status_client.close()
