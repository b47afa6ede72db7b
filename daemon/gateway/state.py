"""What every request handler reaches, made once per gateway process: ``Gateway``.

Its own module so that the routes (routes_*.py) and the application that mounts them
(app.py) both import it, and neither imports the other.
"""

from __future__ import annotations

import asyncio
import gc

from exgen.daemon.gateway.auth import ApiKeys
from exgen.daemon.gateway.batches import BatchManager
from exgen.daemon.gateway.completions import Completions
from exgen.daemon.gateway.errors import ApiError
from exgen.daemon.gateway.metrics import GatewayMetrics
from exgen.daemon.gateway.options import GatewayOptions
from exgen.daemon.gateway.store import Store
from exgen.daemon.gateway.upstream import Upstream


class Gateway:
    """Everything a request handler reaches, made once per process."""

    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.keys = ApiKeys(options.api_keys_file)
        self.store = Store(options.state_dir)
        self.upstream = Upstream(options.router, name=f"exgen gateway http://{options.listen}")
        self.completions = Completions(self.upstream, options.request_timeout_s)
        self.batches = BatchManager(self.store, self.upstream, options)
        self.metrics = GatewayMetrics(self.store, self.upstream)
        self.inflight = 0
        self._status_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.upstream.refresh_status()
        loop = asyncio.get_running_loop()
        self._status_task = loop.create_task(self.upstream.keep_status_fresh())
        await self.batches.start()

    async def stop(self) -> None:
        await self.batches.close()
        if self._status_task is not None:
            self._status_task.cancel()
        self.upstream.close()
        self.store.close()
        # Collected now, a task some request leaked is reported in the log (as "Task was
        # destroyed but it is pending!"), not lost with the process.
        gc.collect()

    def admit(self) -> None:
        """One more interactive request, or a 429 past http_max_inflight."""
        if self.inflight >= self.options.max_inflight:
            raise ApiError(
                429,
                f"Too many requests at once ({self.inflight}; http_max_inflight): retry later",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
                retry_after_s=1,
            )
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)

    def discharge(self) -> None:
        """One interactive request fewer (each ``admit`` has one)."""
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)
