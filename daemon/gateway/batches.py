"""The Batch API's state machine: create, cancel, expiry, and one runner per live batch.

    validating → in_progress → finalizing → completed
         │            ├──────────────────→ expired    (completion_window passed)
         │            └→ cancelling ─────→ cancelled  (POST /v1/batches/{id}/cancel)
         └→ failed (the file broke a whole-file rule: ``errors`` names the lines)

At start every batch the store holds unfinished gets its runner again and resumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any

from exgen.client import openai_body as O
from exgen.daemon.gateway import store as S
from exgen.daemon.gateway.errors import ApiError, not_found
from exgen.daemon.gateway.objects import batch_object
from exgen.daemon.gateway.options import GatewayOptions
from exgen.daemon.gateway.runner import BatchRunner
from exgen.daemon.gateway.upstream import Upstream

logger = logging.getLogger("exgen.gateway.batches")

TICK_S = 0.25
RUNNER_RETRY_S = 5.0
ENDPOINTS = O.OPENAI_URLS
# OpenAI accepts "24h" only; shorter windows (and longer ones) are ours: "90s", "30m", "48h".
WINDOW_RE = re.compile(r"^(\d+)([smh])$")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_METADATA = 16


def window_seconds(text: Any) -> int:
    match = WINDOW_RE.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ApiError(
            400,
            'completion_window must be "24h" (or a duration such as "90s", "30m", "48h")',
            param="completion_window",
        )
    return int(match.group(1)) * WINDOW_UNITS[match.group(2)]


def check_metadata(metadata: Any) -> str | None:
    if metadata is None:
        return None
    fine = isinstance(metadata, dict) and len(metadata) <= MAX_METADATA
    fine = fine and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
        for k, v in metadata.items()
    )
    if not fine:
        raise ApiError(
            400,
            "metadata: at most 16 string keys (64 chars) with string values (512 chars)",
            param="metadata",
        )
    return json.dumps(metadata)


class BatchManager:
    def __init__(self, store: S.Store, upstream: Upstream, options: GatewayOptions) -> None:
        self.store = store
        self.upstream = upstream
        self.options = options
        self.runners: dict[str, BatchRunner] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        unfinished = self.store.unfinished_batches()
        if unfinished:
            logger.info("resuming %d batches: %s", len(unfinished), ", ".join(unfinished))
        for batch_id in unfinished:
            self._spawn(batch_id)
        self.ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()  # each runner commits what is done as it stops
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- requests ----------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        file_id = body.get("input_file_id")
        file = self.store.get_file(file_id) if isinstance(file_id, str) else None
        if file is None:
            raise ApiError(404, f"No file with id {file_id!r}", param="input_file_id")
        if file["purpose"] != "batch":
            message = f"File {file_id} has purpose {file['purpose']!r}, not 'batch'"
            raise ApiError(400, message, param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            message = f"endpoint {endpoint!r} is not supported: use {' or '.join(ENDPOINTS)}"
            raise ApiError(400, message, param="endpoint")
        window = window_seconds(body.get("completion_window"))
        batch_id = f"batch_{uuid.uuid4().hex}"
        now = S.now_s()
        self.store.add_batch(
            {
                "id": batch_id,
                "status": "validating",
                "endpoint": endpoint,
                "input_file_id": file_id,
                "completion_window": body["completion_window"],
                "metadata": check_metadata(body.get("metadata")),
                "model": self.upstream.model,
                "created_at": now,
                "expires_at": now + window,
            }
        )
        logger.info("batch %s created from %s (%s)", batch_id, file_id, endpoint)
        self._spawn(batch_id)
        return self.get(batch_id)

    def get(self, batch_id: str) -> dict[str, Any]:
        row = self.store.get_batch(batch_id)
        if row is None:
            raise not_found("batch", batch_id)
        return batch_object(row)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        row = self.store.get_batch(batch_id)
        if row is None:
            raise not_found("batch", batch_id)
        if row["status"] in ("validating", "in_progress"):
            self.store.set_status(batch_id, "cancelling")
            runner = self.runners.get(batch_id)
            if runner is not None:
                runner.stop("cancelled")
            logger.info("batch %s cancelling", batch_id)
        elif row["status"] not in ("cancelling", "cancelled"):
            message = f"Cannot cancel a batch with status {row['status']!r}"
            raise ApiError(409, message, code="batch_not_cancellable")
        return self.get(batch_id)

    # --- runners -----------------------------------------------------------------------

    def _spawn(self, batch_id: str) -> None:
        runner = BatchRunner(self.store, self.upstream, self.options, batch_id)
        self.runners[batch_id] = runner
        task = asyncio.get_running_loop().create_task(runner.run(), name=batch_id)
        self.tasks[batch_id] = task
        task.add_done_callback(lambda t: self._runner_done(batch_id, t))

    def _runner_done(self, batch_id: str, task: asyncio.Task[None]) -> None:
        self.runners.pop(batch_id, None)
        self.tasks.pop(batch_id, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug, not the batch's fault: log it and resume later from what is committed.
            logger.error("batch %s runner failed; retrying", batch_id, exc_info=exc)
            asyncio.get_running_loop().call_later(RUNNER_RETRY_S, self._respawn, batch_id)

    def _respawn(self, batch_id: str) -> None:
        row = self.store.get_batch(batch_id)
        if row is not None and row["status"] in S.ACTIVE and batch_id not in self.runners:
            self._spawn(batch_id)

    async def _tick(self) -> None:
        """Commit progress on time, not only as answers come; expire what is overdue."""
        while True:
            await asyncio.sleep(TICK_S)
            now = S.now_s()
            for batch_id, runner in list(self.runners.items()):
                runner.commit_if_due()
                row = self.store.get_batch(batch_id)
                if row is None or row["expires_at"] is None or row["status"] == "cancelling":
                    continue
                if row["expires_at"] <= now:
                    if runner.stop_reason is None:
                        logger.info("batch %s: completion window passed, expiring", batch_id)
                    runner.stop("expired")
