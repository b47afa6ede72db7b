"""Getting answers to clients: results owed until acknowledged, and client leases.

The frontend ROUTER runs with ROUTER_MANDATORY and a finite SNDHWM, and every send is
non-blocking, so nothing is dropped silently. What Delivery sends goes into the
outbox; the loop reports how the sends went (``on_sent``, outbox.py):

- FULL, EAGAIN (the client's pipe is full: it is not reading) — the message stays owed,
  unsent; it goes when the pipe drains. The client's unread results stay within the
  unread budget because past it the router stops dispatching that client's items.
- GONE, EHOSTUNREACH (no connection with that identity: the client is gone, or its link is
  reconnecting) — the client is marked unreachable; owed results wait for it to come
  back (any message from it), or for its lease to run out.

Results go out grouped into messages of at most ``results_message_bytes``; a result
larger than ``max_result_bytes`` is replaced by a ``too_large`` error for that item.
Leases: a client with work is probed once a heartbeat (listen.heartbeat_s; an unasked
PONG, which the client reads like any PONG); one unreachable for ``client_grace_s`` is
expired (the router cancels its work).

A RESULTS message counts as handed to ZMQ (``sent_upto``) when it is put in the outbox:
what is already there is never queued twice. If the loop reports it did not go,
``sent_upto`` goes back to before it, so it goes again. After one send to a client
fails, the loop sends that client nothing more in that batch, so results never
arrive out of order.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from exgen.client import protocol as P
from exgen.daemon.router.clients import ClientRecord, who
from exgen.daemon.router.outbox import FULL, GONE, SENT, ToClient
from exgen.daemon.router.rooms import Rooms

logger = logging.getLogger("exgen.delivery")

# Results are encoded one by one (each one's size decides its message): msgspec's
# encoder, about a fifth of msgpack.packb's cost per result, the same bytes.
_ENCODE = msgspec.msgpack.Encoder().encode
SNDHWM = 1000  # messages queued in ZMQ per client; bytes are bounded by the unread budget
RESUME_FRACTION = 0.5  # a paused client resumes once its unread bytes fall to this share

# What a send's outcome means for the client's work (``on_sent``).
LOST = "lost"  # it was just found unreachable: its running items should be taken back
EXPIRED = "expired"  # unreachable past the grace: its work should be cancelled


class Delivery:
    def __init__(self, rooms: Rooms, probe_s: float) -> None:
        self.settings = rooms.settings
        self.clients = rooms.clients
        self.queue = rooms.queue
        self.outbox = rooms.outbox
        self.blocked: set[bytes] = set()  # reachable clients with owed results unsent
        self.next_probe_at = 0.0
        # Seconds between probes: the frontend's heartbeat (listen.heartbeat_s).
        self.probe_s = probe_s

    # --- what the sends did --------------------------------------------------------

    def on_sent(self, record: ClientRecord, send: ToClient, outcome: str, now: float) -> str:
        """Take note of a send's outcome; ``LOST``, ``EXPIRED`` or "" for the router."""
        if send.seq:
            self._owed_outcome(record, send.seq, outcome, now)
        verdict = self._unreachable(record, now) if outcome == GONE else ""
        if send.probe:
            verdict = self._probe_outcome(record, outcome, now) or verdict
        return verdict

    def _owed_outcome(self, record: ClientRecord, seq: int, outcome: str, now: float) -> None:
        if outcome == SENT:
            if record.unacked_since is None:
                record.unacked_since = now
            return
        record.sent_upto = min(record.sent_upto, seq - 1)  # it goes again
        if outcome == FULL and record.reachable:
            self.blocked.add(record.identity)  # the pipe is full: next tick

    def _unreachable(self, record: ClientRecord, now: float) -> str:
        if not record.reachable:
            return ""
        record.reachable = False
        logger.info("client %s unreachable (gone, or its link reconnecting)", who(record))
        self.update_pause(record, now)  # before the next dispatch
        return LOST

    def _probe_outcome(self, record: ClientRecord, outcome: str, now: float) -> str:
        if outcome != GONE:
            record.reachable, record.disconnected_at = True, None
            self.reachable_again(record)
        elif record.disconnected_at is None:
            record.disconnected_at = now
        elif now - record.disconnected_at > self.settings.client_grace_s:
            return EXPIRED
        return ""

    def reachable_again(self, record: ClientRecord) -> None:
        """The client sent something: what it is owed and has not got can go again."""
        if record.unsent:
            self.blocked.add(record.identity)

    # --- results -----------------------------------------------------------------

    def flush(self, now: float) -> None:
        """This tick's results into bounded, numbered messages, into the outbox."""
        for record, results in self.clients.take_new_results():
            for group in self._groups(results):
                body = P.results_body(record.session, record.seq + 1, group)
                self.clients.owe(record, body, len(group))
            self._send_unsent(record)
            self._check_budget(record, now)
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
            frames = [P.MAGIC_VERSION, P.RESULTS, body]
            self.outbox.client(ToClient(record.identity, frames, seq=seq))
            record.sent_upto = seq
        self.blocked.discard(record.identity)

    def acknowledge(self, record: ClientRecord, body: dict[str, Any], now: float) -> None:
        session, seq, resend = body.get("session"), body.get("seq"), body.get("resend", False)
        if session != record.session:
            logger.debug("client %s: an ACK for another session, ignored", who(record))
            return  # an acknowledgement for a session the router has forgotten
        if type(seq) is not int or not isinstance(resend, bool):
            raise P.ValidationError("seq", "must be an integer (with resend true or false)")
        self.clients.acknowledge(record, seq, resend, now)
        if resend and record.unsent:
            logger.info(
                "client %s lost results on its link: sending %d messages again",
                who(record),
                record.seq - record.sent_upto,
            )
            self._send_unsent(record)
        self._check_budget(record, now)

    def _check_budget(self, record: ClientRecord, now: float) -> None:
        budget = self.settings.unread_budget_bytes
        if not record.over_budget and record.unread_bytes > budget:
            record.over_budget = True
        elif record.over_budget and record.unread_bytes <= budget * RESUME_FRACTION:
            record.over_budget = False
        self.update_pause(record, now)

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
                who(record),
                reason,
                record.unread_bytes,
            )
        elif record.pause_reason and not reason:
            self.queue.resume(record.identity)
        record.pause_reason = reason

    # --- leases ------------------------------------------------------------------

    def pong(self, record: ClientRecord, req: str | None, extra: dict[str, Any]) -> None:
        self.outbox.client(self._pong(record, req, extra))

    def _pong(self, record: ClientRecord, req: str | None, extra: dict[str, Any]) -> ToClient:
        body = {
            "req": req,
            "session": record.session,
            "seq": record.sent_upto,
            "acked": record.acked,
            **extra,
        }
        return ToClient(record.identity, P.pack(P.PONG, body))

    def probe(self, now: float, with_work: list[ClientRecord], extra: dict[str, Any]) -> None:
        """Probe the clients that have work (an unasked PONG each): what the sends do
        says who is there (``on_sent``)."""
        for record in self.clients:
            self.update_pause(record, now)
        if now < self.next_probe_at:
            return
        self.next_probe_at = now + self.probe_s
        for record in with_work:
            send = self._pong(record, None, {**extra, "known": True})
            send.probe = True
            self.outbox.client(send)

    def forget(self, identity: bytes) -> None:
        self.queue.resume(identity)
        self.blocked.discard(identity)
        self.clients.forget(identity)
