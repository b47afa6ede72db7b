"""The router: the socket adapter over the daemon's rooms.

It reads client frames (frontend) and worker frames (backend), decodes them, and
hands each to the room that owns the state:

- ``Ledger`` (ledger.py): every accepted item until its one answer; who holds what.
- ``FairQueue`` (fairqueue.py): the waiting room — front, probation, priority tiers,
  one lane per client.
- ``ClientRegistry`` (clients.py): who the clients are, their outboxes.
- ``SlotTable`` (slots.py): one record per slot, shared with the supervisor.

It knows the wire; the rooms know no sockets. Balancing is ``policy.plan_dispatch``
(each worker near capacity + prefetch); liveness is ``liveness.find_unresponsive``.

One prompt's way: SUBMIT → ``Admission.submit`` validates and accepts it (a ledger
entry with its encoded WORK row, a key in its client's lane) → ``dispatch`` takes it
for the least-loaded slot (ledger.assign) → WORK → the worker's DONE → ledger.settle
(only from the slot that holds it) → the client's outbox → one RESULTS per client
per tick.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import zmq

from exgen.client import protocol as P
from exgen.daemon import liveness, policy, wire
from exgen.daemon.admission import Admission
from exgen.daemon.clients import ClientRegistry
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Chunk, Failed, Finished
from exgen.daemon.fairqueue import FairQueue
from exgen.daemon.ledger import Entry, Ledger
from exgen.daemon.slots import READY, Serving, Slot, SlotTable
from exgen.daemon.sockets import readable
from exgen.daemon.status import describe_router

logger = logging.getLogger("exgen.router")

MAX_FRAMES_PER_TICK = 2000  # messages read from one socket before doing anything else
FRONTEND_BUDGET_S = 0.05  # client messages handled per tick, at most, in seconds


class Router:
    def __init__(
        self,
        settings: Settings,
        frontend: zmq.Socket[Any],
        backend: zmq.Socket[Any],
        table: SlotTable,
    ) -> None:
        self.settings = settings
        self.frontend = frontend
        self.backend = backend
        self.table = table
        self.instance = uuid.uuid4().hex
        self.started = time.monotonic()
        self.ledger = Ledger()
        self.queue = FairQueue(longest_first=settings.order == "longest-first")
        self.clients = ClientRegistry()
        self.admission = Admission(self)
        self.isolating: int | None = None  # the slot kept free for probation items
        self.draining = False
        self.garbage_frames = 0
        self.engine_name = ""
        self.model_name = ""
        # Accept → result seconds, for the metrics (which empty it); None when off.
        self.latencies: list[float] | None = None

    # --- client side ------------------------------------------------------------

    def handle_frontend(self, now: float) -> None:
        # A time budget as well as a count: a flood of big submits must not keep the
        # loop from workers' heartbeats and from dispatching (what is left waits).
        budget_end = time.monotonic() + FRONTEND_BUDGET_S
        for _ in range(MAX_FRAMES_PER_TICK):
            if not readable(self.frontend):
                return
            self.admission.client_message(self.frontend.recv_multipart(), now)
            if time.monotonic() > budget_end:
                return

    def reply(self, client: bytes, command: bytes, body: dict[str, Any]) -> None:
        self.frontend.send_multipart([client, *P.pack(command, body)])

    def reply_error(
        self,
        client: bytes,
        code: str,
        message: str,
        *,
        req: str | None = None,
        field_name: str | None = None,
        items: list[str] | None = None,
    ) -> None:
        body = P.error_body(code, message, req=req, field_name=field_name)
        if items is not None:
            body["items"] = items
        body["instance"] = self.instance
        self.reply(client, P.ERROR, body)

    def answer(self, entry: Entry, result: dict[str, Any], now: float) -> None:
        """An entry's one answer, into its client's outbox (flushed once per tick)."""
        if self.latencies is not None:
            self.latencies.append(now - entry.accepted_at)
        self.clients.queue_result(entry.client, result)

    def answer_with_error(self, entries: list[Entry], code: str, message: str) -> None:
        now = time.monotonic()
        for entry in entries:
            self.answer(entry, P.result_error(entry.item_id, code, message), now)

    def flush_results(self) -> None:
        """One RESULTS message per client per tick.

        Each send costs a wakeup of ZMQ's I/O thread (a syscall, and on a busy host a
        context switch): per-worker messages to the same client cost more than the
        results themselves once workers answer faster than the router ticks.
        """
        for record, results in self.clients.take_outboxes():
            self.reply(record.identity, P.RESULTS, {"results": results})

    def cancel_keys(self, keys: set[int]) -> list[Entry]:
        """Take these keys back wherever they are (waiting, or on a worker); the
        entries are forgotten and returned for the caller to answer (or not)."""
        self.queue.remove(keys)
        by_slot: dict[int, list[int]] = {}
        for key in keys:
            holder = self.ledger.holder(key)
            if holder is not None:
                by_slot.setdefault(holder, []).append(key)
        for slot_id, slot_keys in by_slot.items():
            slot = self.table.get(slot_id)
            if slot is not None and slot.serving is not None:
                self.backend.send_multipart([slot.serving.identity, *wire.pack_cancel(slot_keys)])
        return [self.ledger.entries[key] for key in keys if key in self.ledger.entries]

    # --- worker side ------------------------------------------------------------

    def handle_backend(self, now: float) -> None:
        try:
            for _ in range(MAX_FRAMES_PER_TICK):
                if not readable(self.backend):
                    return
                frames = self.backend.recv_multipart()
                try:
                    command, body = P.unpack(frames[1:])
                except P.FrameError as exc:
                    logger.error("bad frames from a worker: %s", exc)
                    continue
                self._worker_message(frames[0], command, body, now)
        finally:
            self.flush_results()

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
        if slot is None or slot.pid != ready.pid:
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
        self.engine_name = serving.engine
        self.model_name = str(serving.describe.get("model", ""))
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
                self.answer(entry, result, now)
        for failure in failed:
            entry = self._settle(slot, serving, failure.key, now, ok=False)
            if entry is not None:
                result = P.result_error(entry.item_id, failure.code, failure.message)
                result["slot"] = slot.id
                self.answer(entry, result, now)

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
                out.setdefault(entry.client, []).append([entry.item_id, chunk.text])
        for client, batch in out.items():
            self.reply(client, P.CHUNKS, {"chunks": batch})

    # --- dispatch ----------------------------------------------------------------

    def dispatch(self) -> None:
        serving = self.table.serving()
        if self.draining or not serving:
            return
        self._dispatch_probation(serving)
        if self.queue.dispatchable == 0:
            return
        base = self.settings.prefetch
        loads = [
            slot.load(base, len(self.ledger.held_by(slot.id)))
            for slot in serving
            if slot.id != self.isolating
        ]
        plan = policy.plan_dispatch(loads, self.queue.dispatchable, base)
        for slot_id, count in plan.items():
            self._send_work(self.table.by_id[slot_id], self.queue.take(count))

    def _dispatch_probation(self, serving: list[Slot]) -> None:
        """Items that shared two crashes run alone, on a worker drained for them."""
        if not self.queue.probation:
            self.isolating = None
            return
        slot = self.table.get(self.isolating) if self.isolating is not None else None
        if slot is None or slot.serving is None:
            slot = min(serving, key=lambda s: (len(self.ledger.held_by(s.id)), s.id))
            self.isolating = slot.id
        if not self.ledger.held_by(slot.id):
            key = self.queue.take_probation()
            if key is not None:
                self._send_work(slot, [key])

    def _send_work(self, slot: Slot, keys: list[int]) -> None:
        if not keys:
            return
        serving = slot.serving
        assert serving is not None
        now = time.monotonic()
        if not self.ledger.held_by(slot.id):
            serving.progress_at = now  # idle time is not a lack of progress
        rows = self.ledger.assign(keys, slot.id, now)
        self.backend.send_multipart([serving.identity, *wire.pack_work(rows)])

    # --- liveness ----------------------------------------------------------------

    def worker_lost(
        self, slot_id: int, pid: int, cause: str, crashed: bool, blames_work: bool = True
    ) -> None:
        """A worker process is gone: its items go back first, or fail if poison."""
        slot = self.table.get(slot_id)
        if slot is None or slot.serving is None or slot.serving.pid != pid:
            return  # it never said READY: it held nothing
        self.table.stop_serving(slot)
        if self.isolating == slot_id:
            self.isolating = None
        held = len(self.ledger.held_by(slot_id))
        released = self.ledger.release_slot(
            slot_id, crashed, blames_work, self.settings.max_attempts, cause
        )
        for entry in released.failed:
            self._fail_poison(entry)
        for key in released.probation:
            self.queue.push_probation(key)
        self.queue.push_front(released.requeue)
        if held:
            logger.warning(
                "slot %d pid %d lost with %d items in flight: %d requeued, %d on probation",
                slot_id,
                pid,
                held,
                len(released.requeue),
                len(self.queue.probation),
            )

    def _fail_poison(self, entry: Entry) -> None:
        message = (
            f"crashed a worker {entry.attempts} times; giving up on it "
            f"(last: {entry.causes[-1] if entry.causes else 'unknown'})"
        )
        logger.error("item %r from a client: %s", entry.item_id, message)
        self.answer_with_error([entry], P.E_WORKER_DIED, message)

    def find_unresponsive(self, now: float) -> list[liveness.Kill]:
        held = {slot_id: len(keys) for slot_id, keys in self.ledger.held.items()}
        return liveness.find_unresponsive(self.table, held, now, now, False, self.settings)

    # --- draining ----------------------------------------------------------------

    def start_draining(self) -> None:
        """Take no new work; tell clients their waiting items were not started."""
        self.draining = True
        self.release(self.queue.drain_all(), "the daemon is shutting down; item not started")

    def release(self, keys: list[int], message: str) -> None:
        """Answer items with a retryable draining error (the client library resends)."""
        by_client: dict[bytes, list[str]] = {}
        for entry in self.ledger.drop(keys):
            by_client.setdefault(entry.client, []).append(entry.item_id)
        for client, ids in by_client.items():
            self.reply_error(client, P.E_DRAINING, message, items=ids)

    @property
    def inflight(self) -> int:
        return self.ledger.inflight

    def status(self, now: float) -> dict[str, Any]:
        return describe_router(self, now)
