"""Getting answers to clients: every send to the frontend, results owed until acknowledged.

The frontend ROUTER runs with ROUTER_MANDATORY and a finite SNDHWM, and every send is
non-blocking, so nothing is dropped silently:

- EAGAIN (the client's pipe is full: it is not reading) — the message stays owed,
  unsent; it goes when the pipe drains. The client's unread results stay within the
  unread budget because past it the router stops dispatching that client's items.
- EHOSTUNREACH (no connection with that identity: the client is gone, or its link is
  reconnecting) — the client is marked unreachable; owed results wait for it to come
  back (any message from it), or for its lease to run out.

Results go out grouped into messages of at most ``results_message_bytes``; a result
larger than ``max_result_bytes`` is replaced by a ``too_large`` error for that item.
Leases: a client with work is probed once a heartbeat (listen.heartbeat_s; an unasked
PONG, which the client reads like any PONG); one unreachable for ``client_grace_s`` is
expired (the router cancels its work).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from exgen.client import protocol as P
from exgen.daemon.clients import ClientRecord, ClientRegistry
from exgen.daemon.config import Settings
from exgen.daemon.fairqueue import FairQueue

logger = logging.getLogger("exgen.delivery")

SENT, FULL, GONE = "sent", "full", "gone"  # what a non-blocking send did
# Results are encoded one by one (each one's size decides its message): msgspec's
# encoder, about a fifth of msgpack.packb's cost per result, the same bytes.
_ENCODE = msgspec.msgpack.Encoder().encode
SNDHWM = 1000  # messages queued in ZMQ per client; bytes are bounded by the unread budget
RESUME_FRACTION = 0.5  # a paused client resumes once its unread bytes fall to this share


class Delivery:
    def __init__(
        self,
        settings: Settings,
        frontend: zmq.Socket[Any],
        clients: ClientRegistry,
        queue: FairQueue,
    ) -> None:
        self.settings = settings
        self.frontend = frontend
        self.clients = clients
        self.queue = queue
        self.blocked: set[bytes] = set()  # reachable clients with owed results unsent
        self.lost: list[ClientRecord] = []  # found unreachable since the router last looked
        self.next_probe_at = 0.0
        # Seconds between probes: the frontend's heartbeat (the daemon sets it from its
        # listen address, listen.heartbeat_s).
        self.probe_s = settings.client_heartbeat_s

    # --- sending -----------------------------------------------------------------

    def send(self, identity: bytes, frames: list[bytes]) -> bool:
        """One message to a client, never blocking; False if it could not go now."""
        return self._send(identity, frames) == SENT

    def _send(self, identity: bytes, frames: list[bytes]) -> str:
        try:
            self.frontend.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            return FULL
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            record = self.clients.get(identity)
            if record is not None:
                self._unreachable(record)
            return GONE
        return SENT

    def _unreachable(self, record: ClientRecord) -> None:
        if record.reachable:
            record.reachable = False
            logger.info("client %s unreachable (gone, or its link reconnecting)", _who(record))
            self.update_pause(record, time.monotonic())  # before the next dispatch
            self.lost.append(record)

    def take_lost(self) -> list[ClientRecord]:
        """Clients found unreachable since the last call (the router recalls their work)."""
        lost, self.lost = self.lost, []
        return [record for record in lost if not record.reachable]

    def reachable_again(self, record: ClientRecord) -> None:
        """The client sent something: what it is owed and has not got can go again."""
        if record.unsent:
            self.blocked.add(record.identity)

    # --- results -----------------------------------------------------------------

    def flush(self) -> None:
        """This tick's results into bounded, numbered messages; send what can go."""
        for record, results in self.clients.take_outboxes():
            for group in self._groups(results):
                body = P.results_body(record.session, record.seq + 1, group)
                self.clients.owe(record, body, len(group))
            self._send_unsent(record)
            self._check_budget(record)
        for identity in list(self.blocked):
            waiting = self.clients.get(identity)
            if waiting is None or not waiting.unsent:
                self.blocked.discard(identity)
            elif waiting.reachable:
                self._send_unsent(waiting)

    def _groups(self, results: list[dict[str, Any]]) -> list[list[bytes]]:
        cap = self.settings.results_message_bytes
        groups: list[list[bytes]] = [[]]
        size = 0
        for result in results:
            encoded = self._encode(result)
            if groups[-1] and size + len(encoded) > cap:
                groups.append([])
                size = 0
            groups[-1].append(encoded)
            size += len(encoded)
        return groups

    def _encode(self, result: dict[str, Any]) -> bytes:
        encoded = _ENCODE(result)
        limit = self.settings.max_result_bytes
        if len(encoded) <= limit:
            return encoded
        message = (
            f"the result is {len(encoded)} bytes, more than max_result_bytes ({limit}); "
            "ask for fewer tokens or raise the setting"
        )
        logger.warning("item %r: %s", result.get("id"), message)
        return _ENCODE(P.result_error(str(result.get("id")), P.E_TOO_LARGE, message))

    def _send_unsent(self, record: ClientRecord) -> None:
        for seq, body in self.clients.unsent(record):
            if not self.send(record.identity, [P.MAGIC_VERSION, P.RESULTS, body]):
                if record.reachable:
                    self.blocked.add(record.identity)  # the pipe is full: next tick
                return
            record.sent_upto = seq
            if record.unacked_since is None:
                record.unacked_since = time.monotonic()
        self.blocked.discard(record.identity)

    def acknowledge(self, record: ClientRecord, body: dict[str, Any]) -> None:
        session, seq, resend = body.get("session"), body.get("seq"), body.get("resend", False)
        if session != record.session:
            logger.debug("client %s: an ACK for another session, ignored", _who(record))
            return  # an acknowledgement for a session the router has forgotten
        if type(seq) is not int or not isinstance(resend, bool):
            raise P.ValidationError("seq", "must be an integer (with resend true or false)")
        self.clients.acknowledge(record, seq, resend, time.monotonic())
        if resend and record.unsent:
            logger.info(
                "client %s lost results on its link: sending %d messages again",
                _who(record),
                record.seq - record.sent_upto,
            )
            self._send_unsent(record)
        self._check_budget(record)

    def _check_budget(self, record: ClientRecord) -> None:
        budget = self.settings.unread_budget_bytes
        if not record.over_budget and record.unread_bytes > budget:
            record.over_budget = True
        elif record.over_budget and record.unread_bytes <= budget * RESUME_FRACTION:
            record.over_budget = False
        self.update_pause(record, time.monotonic())

    def update_pause(self, record: ClientRecord, now: float) -> None:
        """A client's items wait (are not dispatched) while it cannot take results:

        - its unread results passed the unread budget (it reads too slowly or not at all);
        - it is unreachable (gone, or its link reconnecting);
        - it has not acknowledged anything for ``client_heartbeat_s`` while results are
          owed to it (a stopped process: its connection looks alive until the ZMTP
          heartbeats time out, seconds later). The library acknowledges within
          ``ACK_DELAY_S`` of reading, so a live reader is never held by this.

        What already runs goes on; at most that is lost if the client never comes back.
        """
        stale = (
            record.unacked_since is not None
            and now - record.unacked_since > self.settings.client_heartbeat_s
        )
        reason = (
            "unread budget"
            if record.over_budget
            else "unreachable"
            if not record.reachable
            else "not acknowledging"
            if stale
            else ""
        )
        if reason and not record.pause_reason:
            self.queue.pause(record.identity)
            logger.info(
                "client %s: its items wait (%s; %d bytes unread)",
                _who(record),
                reason,
                record.unread_bytes,
            )
        elif record.pause_reason and not reason:
            self.queue.resume(record.identity)
        record.pause_reason = reason

    # --- leases ------------------------------------------------------------------

    def pong(self, record: ClientRecord, req: str | None, extra: dict[str, Any]) -> str:
        body = {
            "req": req,
            "session": record.session,
            "seq": record.sent_upto,
            "acked": record.acked,
            **extra,
        }
        return self._send(record.identity, P.pack(P.PONG, body))

    def probe(
        self, now: float, has_work: Callable[[ClientRecord], bool], extra: dict[str, Any]
    ) -> list[ClientRecord]:
        """Probe the clients that have work; those unreachable past the grace: expired."""
        for record in self.clients:
            self.update_pause(record, now)
        if now < self.next_probe_at:
            return []
        self.next_probe_at = now + self.probe_s
        expired = []
        for record in list(self.clients):
            if not has_work(record):
                continue
            if self.pong(record, None, {**extra, "known": True}) != GONE:
                record.reachable, record.disconnected_at = True, None
                self.reachable_again(record)
            elif record.disconnected_at is None:
                record.disconnected_at = now
            elif now - record.disconnected_at > self.settings.client_grace_s:
                expired.append(record)
        return expired

    def forget(self, identity: bytes) -> None:
        self.queue.resume(identity)
        self.blocked.discard(identity)
        self.clients.forget(identity)


def _who(record: ClientRecord) -> str:
    name = f" {record.name!r}" if record.name else ""
    pid = f" pid {record.pid}" if record.pid else ""
    return f"{record.identity.hex()[:12]}{name}{pid}"
