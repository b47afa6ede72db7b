"""Messages from workers: READY, heartbeats, results (DONE), streamed text, FATAL.

A worker's answer settles an item only through the ledger, and only from the slot
that holds it (``Ledger.settle``); results go to their client through ``Answers``,
streamed text into the outbox. ``heard_until`` is the last moment every waiting
worker message had been read (the loop says when, ``caught_up``): liveness counts a
worker's silence only up to it.
"""

from __future__ import annotations

import logging
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.engines.base import Chunk
from exgen.daemon.net import wire
from exgen.daemon.router.answers import Answers
from exgen.daemon.router.ledger import Entry
from exgen.daemon.router.placement import Affinity
from exgen.daemon.router.rooms import Rooms
from exgen.daemon.supervisor.slots import READY, Serving, Slot

logger = logging.getLogger("exgen.worker_messages")


class WorkerMessages:
    def __init__(self, rooms: Rooms, answers: Answers, affinity: Affinity | None = None) -> None:
        """``affinity``: placement's memory, told what each prefix's results found
        cached (None: not told)."""
        self.affinity = affinity
        self.ledger = rooms.ledger
        self.table = rooms.table
        self.outbox = rooms.outbox
        self.answers = answers
        self.heard_until = rooms.service.started
        self.losers: dict[int, list[int]] = {}  # slot -> hedged keys it lost (one DONE's)

    def handle(self, frames: list[bytes], now: float) -> None:
        """One worker message, ``now`` the time it was read (not the tick's start:
        after a stall the beats that waited in the socket are fresh news, not old
        silence)."""
        try:
            command, payload = P.unpack_header(frames[1:])
        except P.FrameError as exc:
            logger.error("bad frames from a worker: %s", exc)
            return
        self._worker_message(frames[0], command, payload, now)

    def caught_up(self, at: float) -> None:
        """Every worker message waiting at ``at`` has been read."""
        self.heard_until = max(self.heard_until, at)

    def _worker_message(self, identity: bytes, command: bytes, payload: bytes, now: float) -> None:
        try:
            if command == wire.DONE:  # the hot message: decoded typed, in C
                self._on_done(identity, wire.decode_done_body(payload), now)
                return
            body = P.unpack_body(payload)
            if command == wire.CHUNKS:
                self._on_chunks(identity, wire.decode_chunks(body))
            elif command == wire.HEARTBEAT:
                self._on_heartbeat(wire.decode_heartbeat(body), now)
            elif command == wire.READY:
                self._on_ready(identity, wire.decode_ready(body), now)
            elif command == wire.FATAL:
                self._on_fatal(wire.decode_fatal(body))
        except P.FrameError as exc:  # a body that is not a msgpack map
            logger.error("bad frames from a worker: %s", exc)
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
        serving.counters = beat.counters
        serving.rate.append((now, serving.tokens))

    def _on_done(self, identity: bytes, done: wire.DoneBody, now: float) -> None:
        slot = self.table.serving_identity(identity)
        if slot is None:
            return  # a worker already given up for dead: its items are elsewhere now
        serving = slot.serving
        assert serving is not None
        serving.note_burst(len(done.done) + len(done.failed), now)
        for row in done.done:
            # Checked before the entry is settled: a bad row leaves its item owed.
            extra = wire.extra_result(row.extra) if row.extra else None
            entry = self._settle(slot, serving, row.key, now, ok=True)
            if entry is not None:
                result = {
                    "id": entry.item_id,
                    "text": row.text,
                    "finish_reason": row.finish_reason,
                    "prompt_tokens": row.prompt_tokens,
                    "completion_tokens": row.completion_tokens,
                    "slot": slot.id,
                    "error": None,
                }
                if extra:
                    self._add_extra(result, entry, extra)
                self.answers.answer(entry, result, now)
        for key, code, message, field in done.failed:
            entry = self._settle(slot, serving, key, now, ok=False)
            if entry is not None:
                result = P.result_error(entry.item_id, code, message, field)
                result["slot"] = slot.id
                self.answers.answer(entry, result, now)
        if self.losers:
            self._cancel_losers()

    def _add_extra(self, result: dict[str, Any], entry: Entry, extra: dict[str, Any]) -> None:
        """Logprobs, samples, the prompt echo, a prefix-cache hit (placement learns it)."""
        result.update(extra)
        cached = extra.get("cached_tokens", 0)
        if cached and self.affinity is not None and entry.prefix is not None:
            self.affinity.learn(entry.prefix, cached)

    def _cancel_losers(self) -> None:
        """Hedged items answered by one copy: the other copy's worker drops it."""
        for slot_id, keys in self.losers.items():
            loser = self.table.get(slot_id)
            if loser is not None and loser.serving is not None:
                self.outbox.worker(loser.serving.identity, wire.pack_cancel(keys))
        self.losers = {}

    def _settle(self, slot: Slot, serving: Serving, key: int, now: float, ok: bool) -> Entry | None:
        holders = self.ledger.holders(key) if self.ledger.hedges else ()  # none: no copies
        entry = self.ledger.settle(key, slot.id, ok)
        if entry is not None and len(holders) == 2:  # hedged: the first answer wins
            other = holders[0] if holders[1] == slot.id else holders[1]
            self.losers.setdefault(other, []).append(key)
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
            self.outbox.reply(client, P.CHUNKS, {"chunks": batch})  # best effort: not owed
