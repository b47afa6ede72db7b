"""Messages from workers: READY, heartbeats, results (DONE), streamed text, FATAL.

A worker's answer settles an item only through the ledger, and only from the slot
that holds it (``Ledger.settle``); results go to their client's outbox through the
router. ``heard_until`` is the last moment every waiting worker message had been
read: liveness counts a worker's silence only up to it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from exgen.client import protocol as P
from exgen.daemon import wire
from exgen.daemon.engines.base import Chunk, Failed, Finished
from exgen.daemon.ledger import Entry, Ledger
from exgen.daemon.slots import READY, Serving, Slot, SlotTable
from exgen.daemon.sockets import readable

if TYPE_CHECKING:
    from exgen.daemon.router import Router

logger = logging.getLogger("exgen.backend")

MAX_FRAMES_PER_TICK = 2000  # messages read before the loop does anything else


class WorkerMessages:
    def __init__(
        self, router: Router, backend: zmq.Socket[Any], ledger: Ledger, table: SlotTable
    ) -> None:
        self.router = router
        self.backend = backend
        self.ledger = ledger
        self.table = table
        self.heard_until = time.monotonic()

    def handle(self, now: float) -> None:
        """Read what the workers sent (up to a bound); each message is stamped with
        the time it was read, not the tick's start: after a stall the beats that
        waited in the socket are fresh news, not old silence."""
        for _ in range(MAX_FRAMES_PER_TICK):
            if not readable(self.backend):
                self.heard_until = time.monotonic()  # every waiting message is read
                return
            frames = self.backend.recv_multipart()
            try:
                command, body = P.unpack(frames[1:])
            except P.FrameError as exc:
                logger.error("bad frames from a worker: %s", exc)
                continue
            self._worker_message(frames[0], command, body, time.monotonic())

    def nothing_waiting(self, at: float) -> None:
        """The loop's poll found no worker message waiting at ``at``."""
        self.heard_until = max(self.heard_until, at)

    def _worker_message(
        self, identity: bytes, command: bytes, body: dict[str, Any], now: float
    ) -> None:
        try:
            if command == wire.DONE:
                self._on_done(identity, *wire.decode_done(body), now)
            elif command == wire.CHUNKS:
                self._on_chunks(identity, wire.decode_chunks(body))
            elif command == wire.HEARTBEAT:
                self._on_heartbeat(wire.decode_heartbeat(body), now)
            elif command == wire.READY:
                self._on_ready(identity, wire.decode_ready(body), now)
            elif command == wire.FATAL:
                self._on_fatal(wire.decode_fatal(body))
        except (KeyError, TypeError, ValueError) as exc:
            # Workers are our own code, but a bad message must not take the router down.
            logger.error("bad %r message from a worker: %r", command, exc)

    def _on_ready(self, identity: bytes, ready: wire.Ready, now: float) -> None:
        slot = self.table.get(ready.slot)
        if slot is None or not slot.is_process(ready.pid):
            logger.warning(
                "READY from slot %d pid %d, which is not that slot's process", ready.slot, ready.pid
            )
            return
        serving = Serving(
            pid=ready.pid,
            identity=identity,
            capacity=ready.capacity,
            engine=ready.engine,
            load_s=ready.load_s,
            max_seq_len=ready.max_seq_len,
            describe=ready.describe,
            ready_at=now,
            last_heartbeat=now,
            progress_at=now,
        )
        self.table.start_serving(slot, serving)
        slot.state = READY
        self.router.engine_name = serving.engine
        logger.info(
            "ready slot %d pid %d: %s, capacity %d, loaded in %.2fs",
            slot.id,
            ready.pid,
            serving.engine,
            serving.capacity,
            serving.load_s,
        )

    def _on_fatal(self, fatal: wire.Fatal) -> None:
        slot = self.table.get(fatal.slot)
        if slot is not None:
            slot.boot_error = fatal.message

    def _on_heartbeat(self, beat: wire.Beat, now: float) -> None:
        slot = self.table.get(beat.slot)
        if slot is None:
            return
        serving = slot.serving
        if serving is None or serving.pid != beat.pid:
            slot.loading_beat = now
            return
        serving.last_heartbeat = now
        if beat.progress != serving.progress:
            serving.progress = beat.progress
            serving.progress_at = now
        serving.tokens = beat.tokens
        serving.rate.append((now, serving.tokens))

    def _on_done(
        self, identity: bytes, finished: list[Finished], failed: list[Failed], now: float
    ) -> None:
        slot = self.table.serving_identity(identity)
        if slot is None:
            return  # a worker already given up for dead: its items are elsewhere now
        serving = slot.serving
        assert serving is not None
        serving.note_burst(len(finished) + len(failed), now)
        for event in finished:
            entry = self._settle(slot, serving, event.key, now, ok=True)
            if entry is not None:
                result = {
                    "id": entry.item_id,
                    "text": event.text,
                    "finish_reason": event.finish_reason,
                    "prompt_tokens": event.prompt_tokens,
                    "completion_tokens": event.completion_tokens,
                    "slot": slot.id,
                    "error": None,
                }
                if event.logprobs is not None:
                    result["logprobs"] = event.logprobs
                if event.choices is not None:
                    result["choices"] = [c.to_wire() for c in event.choices]
                if event.prompt is not None:
                    result["prompt"] = event.prompt.to_wire()
                self.router.answer(entry, result, now)
        for failure in failed:
            entry = self._settle(slot, serving, failure.key, now, ok=False)
            if entry is not None:
                result = P.result_error(
                    entry.item_id, failure.code, failure.message, failure.field
                )
                result["slot"] = slot.id
                self.router.answer(entry, result, now)

    def _settle(
        self, slot: Slot, serving: Serving, key: int, now: float, ok: bool
    ) -> Entry | None:
        entry = self.ledger.settle(key, slot.id, ok)
        if entry is not None:
            serving.progress_at = now
            if ok:
                serving.completed += 1
            else:
                serving.failed += 1
        return entry

    def _on_chunks(self, identity: bytes, chunks: list[Chunk]) -> None:
        slot = self.table.serving_identity(identity)
        if slot is None:
            return
        out: dict[bytes, list[list[Any]]] = {}
        for chunk in chunks:
            entry = self.ledger.entries.get(chunk.key)
            if entry is not None and entry.slot == slot.id:
                row = [entry.item_id, chunk.text, chunk.completion_tokens, chunk.prompt_tokens]
                out.setdefault(entry.client, []).append(row)
        for client, batch in out.items():
            self.router.reply(client, P.CHUNKS, {"chunks": batch})  # best effort: not owed
