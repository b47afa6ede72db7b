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

import heapq
import logging
import time
import uuid
from typing import Any

import zmq

from exgen.client import protocol as P
from exgen.daemon import liveness, wire
from exgen.daemon.admission import Admission
from exgen.daemon.backend import WorkerMessages
from exgen.daemon.clients import ClientRecord, ClientRegistry
from exgen.daemon.config import Settings
from exgen.daemon.control import LOCAL
from exgen.daemon.delivery import Delivery
from exgen.daemon.dispatch import Dispatcher
from exgen.daemon.fairqueue import FairQueue
from exgen.daemon.ledger import Entry, Ledger
from exgen.daemon.slots import SlotTable
from exgen.daemon.sockets import readable
from exgen.daemon.status import describe_router

logger = logging.getLogger("exgen.router")

IDLE_CLIENT_FORGET_S = 600.0  # a client with nothing here, silent this long, is forgotten
MAX_FRAMES_PER_TICK = 2000  # messages read from one socket before doing anything else
FRONTEND_BUDGET_S = 0.05  # client messages handled per tick, at most, in seconds
STALL_S = 0.5  # a loop turn this long is a stall of the router's own (logged, and the
#               kills it leads to blame no work)


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
        self.delivery = Delivery(settings, frontend, self.clients, self.queue)
        self.admission = Admission(self)
        self.workers = WorkerMessages(self, backend, self.ledger, table)
        self.dispatcher = Dispatcher(settings, backend, self.ledger, self.queue, table)
        self.deadlines: list[tuple[float, int]] = []  # (deadline, key), a heap
        # Who may cancel whom (control.py), and the CURVE keys let in (None: no CURVE);
        # the daemon sets both from its listen address and keys.
        self.access = LOCAL
        self.allowed_users: set[str] | None = None
        self.last_stall_at = -1e9
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
            if self.access == LOCAL:
                self.admission.client_message(self.frontend.recv_multipart(), now)
            else:
                self._inspected_message(now)
            if time.monotonic() > budget_end:
                return

    def _inspected_message(self, now: float) -> None:
        """A message whose sender's key (CURVE) and address are looked at: a key taken
        off the allowed list loses service from its next message, open connection or
        not (the ZAP handshake only checks a connection once)."""
        parts = self.frontend.recv_multipart(copy=False)
        user = str(parts[-1].get("User-Id")) if self.allowed_users is not None else ""
        peer = str(parts[-1].get("Peer-Address") or "")
        frames = [part.bytes for part in parts]
        if self.allowed_users is not None and user not in self.allowed_users:
            self.garbage_frames += 1
            record = self.clients.get(frames[0])
            if record is not None:
                logger.warning("client %s: its CURVE key was revoked", record.name or user)
                self.expire_client(record, now)
            return
        self.admission.client_message(frames, now, user or None, peer or None)

    def reply(self, client: bytes, command: bytes, body: dict[str, Any]) -> None:
        """A message that is not owed (the client's own timers cover its loss)."""
        self.delivery.send(client, P.pack(command, body))

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
        self.clients.queue_result(entry.client, result, now)

    def answer_with_error(self, entries: list[Entry], code: str, message: str) -> None:
        now = time.monotonic()
        for entry in entries:
            self.answer(entry, P.result_error(entry.item_id, code, message), now)

    def flush_results(self) -> None:
        """The tick's results to their clients, grouped (``Delivery.flush``).

        Each send costs a wakeup of ZMQ's I/O thread (a syscall, and on a busy host a
        context switch): per-worker messages to the same client cost more than the
        results themselves once workers answer faster than the router ticks.
        """
        self.delivery.flush()
        self._recall_lost()

    def cancel_keys(self, keys: set[int]) -> list[Entry]:
        """Take these keys out of the waiting room and off the workers (told to drop
        them); their entries are returned, still in the ledger, for the caller to
        finish, drop or requeue."""
        self.queue.remove(keys)
        self._cancel_on_workers(keys)
        return [self.ledger.entries[key] for key in keys if key in self.ledger.entries]

    def _cancel_on_workers(self, keys: set[int]) -> None:
        """Tell each worker holding some of these keys to drop them."""
        by_slot: dict[int, list[int]] = {}
        for key in keys:
            holder = self.ledger.holder(key)
            if holder is not None:
                by_slot.setdefault(holder, []).append(key)
        for slot_id, slot_keys in by_slot.items():
            slot = self.table.get(slot_id)
            if slot is not None and slot.serving is not None:
                self.backend.send_multipart([slot.serving.identity, *wire.pack_cancel(slot_keys)])

    # --- workers and dispatch -------------------------------------------------------

    def handle_backend(self, now: float, waiting: bool = True) -> None:
        """Read the workers' messages (``waiting``: the loop's poll saw some)."""
        if waiting:
            self.workers.handle(now)
        else:
            self.workers.nothing_waiting(now)

    def dispatch(self) -> None:
        if not self.draining:
            self.dispatcher.dispatch()

    # --- liveness ----------------------------------------------------------------

    def worker_lost(
        self, slot_id: int, pid: int, cause: str, crashed: bool, blames_work: bool = True
    ) -> None:
        """A worker process is gone: its items go back first, or fail if poison."""
        slot = self.table.get(slot_id)
        if slot is None or slot.serving is None or slot.serving.pid != pid:
            return  # it never said READY: it held nothing
        self.table.stop_serving(slot)
        self.dispatcher.slot_lost(slot_id)
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
        heard_until = min(now, self.workers.heard_until)
        lagged = now - self.last_stall_at < self.settings.heartbeat_timeout_s
        return liveness.find_unresponsive(
            self.table, held, now, heard_until, lagged, self.settings
        )

    def note_turn(self, started: float, ended: float) -> None:
        """One loop turn's length: a long one is the router's own stall."""
        if ended - started >= STALL_S:
            self.last_stall_at = ended
            logger.warning(
                "router loop stalled for %.2fs; worker deadlines are counted from what "
                "was read, and kills in the next %.0fs blame no prompt",
                ended - started,
                self.settings.heartbeat_timeout_s,
            )

    # --- deadlines ---------------------------------------------------------------

    def add_deadline(self, entry: Entry, timeout_s: float) -> None:
        entry.deadline = entry.accepted_at + timeout_s
        heapq.heappush(self.deadlines, (entry.deadline, entry.key))

    def expire_deadlines(self, now: float) -> None:
        """Items past their deadline: cancelled where they are, answered ``timeout``."""
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, key = heapq.heappop(self.deadlines)
            entry = self.ledger.entries.get(key)
            if entry is None or entry.deadline != deadline:
                continue  # answered already
            ran = now - entry.dispatched_at if entry.slot is not None and entry.dispatched_at else 0
            waited = now - entry.accepted_at - ran
            self.cancel_keys({key})
            message = (
                f"deadline of {deadline - entry.accepted_at:g}s passed: waited {waited:.2f}s "
                f"in the queue and ran {ran:.2f}s"
            )
            self.answer_with_error(self.ledger.finish([key]), P.E_TIMEOUT, message)

    # --- client leases -------------------------------------------------------------

    def has_work(self, record: ClientRecord) -> bool:
        """Whether the router holds anything for this client (PONG's ``known``)."""
        return bool(self.ledger.count_of(record.identity) or record.owed or record.outbox)

    def check_leases(self, now: float) -> None:
        """Probe clients with work; cancel the work of those gone past the grace."""
        extra = {"instance": self.instance, "draining": self.draining}
        for record in self.delivery.probe(now, self.has_work, extra):
            self.expire_client(record, now)
        self._recall_lost()
        for record in list(self.clients):
            idle = now - record.last_seen > IDLE_CLIENT_FORGET_S
            if (idle or not record.reachable) and not self.has_work(record):
                self.delivery.forget(record.identity)

    def _recall_lost(self) -> None:
        """A client found unreachable has its running items taken back from the workers
        (they wait again, unstarted, in its paused lane): if it never comes back, at
        most their partial progress was spent for nobody, not whole batches run to the
        end and the prefetched ones after them. If it comes back within the grace (a
        link that reset), they run again."""
        for record in self.delivery.take_lost():
            running = self.ledger.running_keys_of(record.identity)
            if not running:
                continue
            self._cancel_on_workers(running)  # they drop them (nothing is answered)
            for entry in self.ledger.recall(running):
                self.queue.push(entry.client, entry.key, entry.budget, entry.tier)
            logger.info(
                "client %s unreachable: %d running items taken back until it returns",
                record.name or record.identity.hex()[:12],
                len(running),
            )

    def expire_client(self, record: ClientRecord, now: float) -> None:
        """A client gone past its grace: stop its work, drop what it was owed."""
        keys = self.ledger.keys_of(record.identity)
        running = sum(1 for key in keys if self.ledger.holder(key) is not None)
        dropped = self.ledger.drop(e.key for e in self.cancel_keys(keys))
        self.ledger.abandoned += len(dropped)
        gone_s = now - (record.disconnected_at or now)
        logger.warning(
            "client %s gone for %.1fs: cancelled %d waiting and %d running items, "
            "dropped %d unread results",
            record.name or record.identity.hex()[:12],
            gone_s,
            len(dropped) - running,
            running,
            record.unread,
        )
        self.delivery.forget(record.identity)

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
