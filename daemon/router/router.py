"""The router, sans I/O: plain data in, messages out.

The daemon's loop (daemon/server.py) reads the sockets and calls in — ``on_client`` with a
client's frames, ``on_worker`` with a worker's, ``on_worker_exit`` with what the
supervisor reaped, ``tick`` as time passes, then ``flush_results`` and ``dispatch``
— and after each call sends what the handlers left in ``outbox`` (outbox.py). How a
send to a client went comes back through ``on_sent``; nothing here touches a socket.

The state lives in the rooms (rooms.py), built here once; the handlers each own one
side of the traffic:

- ``Admission`` (admission.py): a client's message — submit, ack, ping, hello,
  status; ``Cancels`` (control.py) for cancelling.
- ``WorkerMessages`` (worker_messages.py): a worker's message — READY, heartbeats, results.
- ``Delivery`` (delivery.py): results owed to clients until acknowledged; leases.
- ``Dispatcher`` (dispatch.py): waiting items to workers, each worker near capacity +
  prefetch — by shared prompt prefix and estimated work (``placement.plan_placement``,
  the default) or by count (``policy.plan_dispatch``) — and back; with ``hedge`` on,
  copies of stragglers to idle workers at the end of a job (``hedging.plan_hedges``).
- ``Answers`` (answers.py): every item's one answer, into its client's results.

Liveness is ``liveness.find_unresponsive``: the router says which workers to kill,
the supervisor kills them.

One prompt's way: SUBMIT → ``Admission.submit`` validates and accepts it (a ledger
entry with its encoded WORK row and prefix key, a key in its client's lane) →
``Dispatcher`` stages it and places it: on the worker that holds its prefix, else the
least loaded by estimated work (``Ledger.assign``) → WORK, in the outbox → the
worker's DONE, its rows decoded typed (``wire.DoneRow``) → ``WorkerMessages``:
``Ledger.settle`` (only from a slot that holds it), the result built from the row →
``Answers`` → ``Delivery.flush``: one RESULTS per client per tick, owed until
acknowledged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.router.admission import Admission
from exgen.daemon.router.answers import Answers
from exgen.daemon.router.clients import ClientRecord, who
from exgen.daemon.router.control import LOCAL, Cancels
from exgen.daemon.router.delivery import EXPIRED, LOST, Delivery
from exgen.daemon.router.dispatch import Dispatcher
from exgen.daemon.router.ledger import Deadlines, Entry
from exgen.daemon.router.outbox import ToClient
from exgen.daemon.router.rooms import Rooms, Service
from exgen.daemon.router.status import describe_router
from exgen.daemon.router.worker_messages import WorkerMessages
from exgen.daemon.supervisor import liveness
from exgen.daemon.supervisor.slots import SlotTable

logger = logging.getLogger("exgen.router")

IDLE_CLIENT_FORGET_S = 600.0  # a client with nothing here, silent this long, is forgotten
STALL_S = 0.5  # a loop turn this long is a stall of the router's own (logged, and the
#               kills it leads to blame no work)


class Router:
    def __init__(
        self,
        settings: Settings,
        table: SlotTable,
        *,
        model_name: str = "",
        access: str = LOCAL,
        allowed_users: set[str] | None = None,
        probe_s: float | None = None,
        latencies: list[float] | None = None,
    ) -> None:
        """``access``: who may cancel whom (control.py); ``allowed_users``: the CURVE
        keys let in (None: no CURVE); ``probe_s``: seconds between lease probes
        (default: the client heartbeat); ``latencies``: the metrics' list of accept →
        answer seconds (None: metrics off)."""
        self.settings = settings
        self.rooms = Rooms.build(settings, table, Service(model_name, time.monotonic()))
        self.service = self.rooms.service
        self.ledger = self.rooms.ledger
        self.queue = self.rooms.queue
        self.clients = self.rooms.clients
        self.table = table
        self.outbox = self.rooms.outbox
        self.answers = Answers(self.clients, latencies)
        self.deadlines = Deadlines()
        self.delivery = Delivery(self.rooms, probe_s or settings.client_heartbeat_s)
        self.dispatcher = Dispatcher(self.rooms)
        cancels = Cancels(self.rooms, self.dispatcher, self.answers, access)
        self.admission = Admission(self.rooms, self.delivery, cancels, self.deadlines)
        self.worker_messages = WorkerMessages(self.rooms, self.answers, self.dispatcher.affinity)
        self.allowed_users = allowed_users
        self.last_stall_at = -1e9

    # --- messages in ---------------------------------------------------------------

    def on_client(
        self, frames: list[bytes], now: float, user: str | None = None, peer: str | None = None
    ) -> None:
        """A client's message (its identity first); ``user``: its CURVE key (z85) and
        ``peer``: its address, where the loop looks at them (CURVE, TCP)."""
        if self.allowed_users is not None and user not in self.allowed_users:
            self._revoked(frames[0], user, now)
            return
        self.admission.client_message(frames, now, user, peer)

    def _revoked(self, identity: bytes, user: str | None, now: float) -> None:
        """A key taken off the allowed list loses service from its next message, open
        connection or not (the ZAP handshake only checks a connection once)."""
        record = self.clients.get(identity)
        if record is not None:
            logger.warning("client %s: its CURVE key %s was revoked", who(record), user)
            self.expire_client(record, now)

    def allow_users(self, users: set[str]) -> None:
        """The CURVE keys let in from now on (SIGHUP re-read them)."""
        self.allowed_users = users

    def on_worker(self, frames: list[bytes], now: float) -> None:
        """A worker's message (its identity first), ``now`` the time it was read."""
        self.worker_messages.handle(frames, now)

    def caught_up_with_workers(self, at: float) -> None:
        """Every worker message waiting at ``at`` has been read (liveness counts a
        worker's silence only up to then)."""
        self.worker_messages.caught_up(at)

    def on_sent(self, send: ToClient, outcome: str, now: float) -> None:
        """What the loop's send of a client message did: every one that did not go
        (``FULL``, ``GONE``), and those that asked (``send.report``)."""
        record = self.clients.get(send.identity)
        if record is None:
            return  # forgotten meanwhile
        verdict = self.delivery.on_sent(record, send, outcome, now)
        if verdict == LOST:
            self._take_back(record)
        elif verdict == EXPIRED:
            self.expire_client(record, now)

    # --- time ----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """What time alone changes: client leases, item deadlines."""
        self._check_leases(now)
        self._expire_deadlines(now)

    def flush_results(self, now: float) -> None:
        """The tick's results to their clients, grouped (``Delivery.flush``).

        Each send costs a wakeup of ZMQ's I/O thread (a syscall, and on a busy host a
        context switch): per-worker messages to the same client cost more than the
        results themselves once workers answer faster than the router ticks.
        """
        self.delivery.flush(now)

    def dispatch(self, now: float) -> None:
        if not self.service.draining:
            self.dispatcher.dispatch(now)

    def starving(self) -> bool:
        """A worker sits idle while items wait (the loop dispatches before it reads
        more client messages)."""
        return not self.service.draining and self.dispatcher.starving()

    # --- workers -------------------------------------------------------------------

    def on_worker_exit(
        self,
        slot_id: int,
        pid: int,
        cause: str,
        crashed: bool,
        now: float,
        blames_work: bool = True,
    ) -> None:
        """A worker process is gone: its items go back first, or fail if poison."""
        slot = self.table.get(slot_id)
        if slot is None or slot.serving is None or slot.serving.pid != pid:
            return  # it never said READY: it held nothing
        self.table.stop_serving(slot)
        held = len(self.ledger.held_by(slot_id))
        orphans = self.ledger.orphan_slot(
            slot_id, crashed, blames_work, self.settings.max_attempts, cause
        )
        for entry in orphans.failed:
            self._fail_poison(entry, now)
        self.dispatcher.requeue(slot_id, orphans)
        if held:
            logger.warning(
                "slot %d pid %d lost with %d items in flight: %d requeued, %d on probation",
                slot_id,
                pid,
                held,
                len(orphans.requeue),
                len(self.queue.probation),
            )

    def _fail_poison(self, entry: Entry, now: float) -> None:
        message = (
            f"crashed a worker {entry.attempts} times; giving up on it "
            f"(last: {entry.causes[-1] if entry.causes else 'unknown'})"
        )
        logger.error("item %r from a client: %s", entry.item_id, message)
        self.answers.fail([entry], P.E_WORKER_DIED, message, now)

    def find_unresponsive(self, now: float) -> list[liveness.Kill]:
        held = {slot_id: len(keys) for slot_id, keys in self.ledger.held.items()}
        heard_until = min(now, self.worker_messages.heard_until)
        lagged = now - self.last_stall_at < self.settings.heartbeat_timeout_s
        return liveness.find_unresponsive(self.table, held, now, heard_until, lagged, self.settings)

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

    # --- deadlines -----------------------------------------------------------------

    def _expire_deadlines(self, now: float) -> None:
        """Items past their deadline: cancelled where they are, answered ``timeout``."""
        for entry in self.deadlines.past(now, self.ledger):
            assert entry.deadline is not None
            ran = now - entry.dispatched_at if entry.slot is not None and entry.dispatched_at else 0
            waited = now - entry.accepted_at - ran
            self.dispatcher.withdraw({entry.key})
            message = (
                f"deadline of {entry.deadline - entry.accepted_at:g}s passed: waited "
                f"{waited:.2f}s in the queue and ran {ran:.2f}s"
            )
            self.answers.fail(self.ledger.finish([entry.key]), P.E_TIMEOUT, message, now)

    # --- client leases -------------------------------------------------------------

    def has_work(self, record: ClientRecord) -> bool:
        return record.has_work(self.ledger.count_of(record.identity))

    def _check_leases(self, now: float) -> None:
        """Probe clients with work (``on_sent`` hears who is gone); forget the idle."""
        extra = {"instance": self.service.instance, "draining": self.service.draining}
        self.delivery.probe(now, [r for r in self.clients if self.has_work(r)], extra)
        for record in list(self.clients):
            idle = now - record.last_seen > IDLE_CLIENT_FORGET_S
            if (idle or not record.reachable) and not self.has_work(record):
                self.delivery.forget(record.identity)

    def _take_back(self, record: ClientRecord) -> None:
        """A client found unreachable has its running items taken back from the workers
        (they wait again, unstarted, in its paused lane): if it never comes back, at
        most their partial progress was spent for nobody, not whole batches run to the
        end and the prefetched ones after them. If it comes back within the grace (a
        link that reset), they run again."""
        running = self.dispatcher.take_back(record.identity)
        if running:
            logger.info(
                "client %s unreachable: %d running items taken back until it returns",
                who(record),
                running,
            )

    def expire_client(self, record: ClientRecord, now: float) -> None:
        """A client gone past its grace: stop its work, drop what it was owed."""
        keys = self.ledger.keys_of(record.identity)
        running = sum(1 for key in keys if self.ledger.holder(key) is not None)
        dropped = self.ledger.abandon(e.key for e in self.dispatcher.withdraw(keys))
        gone_s = now - (record.disconnected_at or now)
        logger.warning(
            "client %s gone for %.1fs: cancelled %d waiting and %d running items, "
            "dropped %d unread results",
            who(record),
            gone_s,
            len(dropped) - running,
            running,
            record.unread,
        )
        self.delivery.forget(record.identity)

    # --- draining ------------------------------------------------------------------

    def start_draining(self) -> None:
        """Take no new work; tell clients their waiting items were not started."""
        self.service.draining = True
        self.hand_back(self.queue.drain_all(), "the daemon is shutting down; item not started")

    def hand_back(self, keys: list[int], message: str) -> None:
        """Drop these items and answer them with a retryable draining error (the
        client library sends them again, to a daemon that runs them)."""
        by_client: dict[bytes, list[str]] = {}
        for entry in self.ledger.drop(keys):
            by_client.setdefault(entry.client, []).append(entry.item_id)
        for client, ids in by_client.items():
            self.outbox.error(client, P.E_DRAINING, message, items=ids)

    # --- views ---------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.service.draining

    @property
    def inflight(self) -> int:
        return self.ledger.inflight

    def status(self, now: float) -> dict[str, Any]:
        return describe_router(self.rooms, now)
