"""What a client's message does: submit (refuse or accept), acknowledge, ping, hello,
status; cancelling is ``control.Cancels``.

Admission decides and puts its answers in the outbox. Refusals come before
validation where they can: under a flood, checking thousands of items only to
answer "busy" would become the router's main work. Every body is decoded at a
bounded cost first (``decode``).
"""

from __future__ import annotations

import logging
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.net import wire
from exgen.daemon.router import decode, placement
from exgen.daemon.router.clients import ClientRecord
from exgen.daemon.router.control import Cancels
from exgen.daemon.router.delivery import Delivery
from exgen.daemon.router.ledger import Deadlines
from exgen.daemon.router.rooms import Rooms
from exgen.daemon.router.status import describe_router

logger = logging.getLogger("exgen.admission")


class Admission:
    def __init__(
        self, rooms: Rooms, delivery: Delivery, cancels: Cancels, deadlines: Deadlines
    ) -> None:
        self.rooms = rooms
        self.settings = rooms.settings
        self.service = rooms.service
        self.ledger = rooms.ledger
        self.queue = rooms.queue
        self.clients = rooms.clients
        self.outbox = rooms.outbox
        self.delivery = delivery
        self.cancels = cancels
        self.deadlines = deadlines
        self.placing = self.settings.placement != "count"
        # "cost" balances by estimated work but keys nothing: no prefix proxy.
        prefix = self.settings.placement == "prefix"
        self.key_bytes = self.settings.prefix_key_bytes if prefix else 0
        # A text prompt shorter than this has no key: its facts without a call.
        self.keyless_chars = placement.keyless_text_chars(self.key_bytes) if prefix else 0

    def client_message(
        self, frames: list[bytes], now: float, user: str | None = None, peer: str | None = None
    ) -> None:
        """One client message; ``user``: its CURVE key (z85) and ``peer``: its address,
        when the router looks at them (CURVE, or TCP beyond loopback)."""
        if len(frames) < 2:
            return  # not even an identity and a header: nobody to answer
        client, rest = frames[0], frames[1:]
        try:
            command, payload = P.unpack_header(rest)
        except P.FrameError as exc:
            self._on_bad_frames(client, rest, exc)
            return
        record = self.clients.seen(client, now)
        record.user, record.peer = user, peer
        self.delivery.reachable_again(record)
        req: str | None = None
        try:
            if command == P.SUBMIT:
                envelope = decode.decode_submit(payload)
                req = envelope.req if isinstance(envelope.req, str) else None
                self.submit(record, envelope, now)
            elif command == P.CANCEL:
                body = decode.decode_cancel(payload)
                req = body["req"] if isinstance(body["req"], str) else None
                self.cancels.handle(record, body, req, now)
            else:
                body = decode.decode_small(payload)
                req = body.get("req") if isinstance(body.get("req"), str) else None
                self._small(record, command, body, req, now)
        except P.ValidationError as exc:
            req = req or decode.request_id(payload)
            self.outbox.error(client, P.E_BAD_REQUEST, exc.message, req=req, field_name=exc.field)
        except Exception:
            # A bug of ours met by one client's message must cost that message only,
            # not the router loop (and everyone's work with it).
            logger.exception("internal error on a %r message from a client", command)
            self.outbox.error(client, P.E_INTERNAL, "internal error (see the daemon log)", req=req)

    def _small(
        self,
        record: ClientRecord,
        command: bytes,
        body: dict[str, Any],
        req: str | None,
        now: float,
    ) -> None:
        if command == P.ACK:
            self.delivery.acknowledge(record, body, now)
        elif command == P.PING:
            known = record.has_work(self.ledger.count_of(record.identity))
            service = self.service
            extra = {"instance": service.instance, "draining": service.draining, "known": known}
            self.delivery.pong(record, req, extra)
        elif command == P.STATUS:
            status = describe_router(self.rooms, now)
            self.outbox.reply(record.identity, P.STATUS_REPLY, {**status, "req": req})
        elif command == P.HELLO:
            self.hello(record, body, req)
        else:
            message = f"unknown command {command!r}"
            self.outbox.error(record.identity, P.E_BAD_REQUEST, message, req=req)

    def _on_bad_frames(self, client: bytes, frames: list[bytes], exc: P.FrameError) -> None:
        """Garbage is dropped; a peer that speaks our protocol badly is told why."""
        if frames and frames[0][:3] == P.MAGIC:
            self.outbox.error(client, P.E_PROTOCOL, str(exc))
        else:
            logger.debug("dropped %d garbage frame(s) from a client", len(frames))

    # --- submit ------------------------------------------------------------------

    def submit(self, record: ClientRecord, envelope: decode.Envelope, now: float) -> None:
        client = record.identity
        if isinstance(envelope.req, str) and self._refused(client, envelope.req, envelope):
            return
        submit = envelope.submit()
        accepted = 0
        tier = P.PRIORITIES.index(submit.priority)
        strict = self.settings.strict_model
        for item in submit.items:
            if self.ledger.knows(client, item.id):
                continue  # a resend of something we already have: answered once
            if strict and self._wrong_model(item):
                self._reject(record, item.id, P.E_MODEL_NOT_FOUND, self._model_message(item), now)
                continue
            self._accept(client, item, submit.stream, tier, now)
            accepted += 1
        for item_id, error in submit.rejected:
            self._reject(record, item_id, P.E_BAD_REQUEST, error.message, now, error.field)
        self.outbox.reply(
            client,
            P.ACCEPTED,
            {
                "req": submit.req,
                "n": accepted,
                "queued": self.queue.size,
                "instance": self.service.instance,
                "session": record.session,
                "model": self.service.model_name,
            },
        )

    def _reject(
        self,
        record: ClientRecord,
        item_id: str,
        code: str,
        message: str,
        now: float,
        field: str | None = None,
    ) -> None:
        """A per-item error at the door, owed like any other result."""
        result = P.result_error(item_id, code, message, field)
        self.clients.queue_result(record.identity, result, now)
        self.ledger.refused()

    def _wrong_model(self, item: P.Item) -> bool:
        return (
            self.settings.strict_model
            and item.model is not None
            and item.model != self.service.model_name
        )

    def _model_message(self, item: P.Item) -> str:
        return (
            f"model {item.model!r} is not served here (this daemon serves "
            f"{self.service.model_name!r}; strict_model is on)"
        )

    def _refused(self, client: bytes, req: str, envelope: decode.Envelope) -> bool:
        """Draining or busy: the items are handed back (the client library resends).
        Their ids are read only then: a submit that is taken never decodes them twice."""
        if self.service.draining:
            message = "the daemon is shutting down"
            self.outbox.error(client, P.E_DRAINING, message, req=req, items=envelope.ids())
            return True
        raws = envelope.raws
        full = self._queue_full(client, len(raws), sum(len(raw) for raw in raws))
        if full is not None:
            self.outbox.error(client, P.E_BUSY, full, req=req, items=envelope.ids())
            return True
        return False

    def _queue_full(self, client: bytes, n: int, nbytes: int) -> str | None:
        """Why the queue cannot take these now, or None. The last tenth of each budget
        is kept for clients with nothing waiting, so one client flooding the queue
        full never locks a one-line request out."""
        items, size = self.settings.max_queue, self.settings.max_queue_bytes
        if self.queue.waiting(client) == 0:
            items += max(1, items // 10)
            size += size // 10
        if self.queue.size + n > items:
            return f"queue full ({self.queue.size} items waiting)"
        if self.ledger.nbytes + nbytes > size:
            return f"queue full ({self.ledger.nbytes // 2**20} MiB of items held)"
        return None

    def _accept(self, client: bytes, item: P.Item, stream: bool, tier: int, now: float) -> None:
        key = self.ledger.reserve_key()
        budget = item.params.get("max_new_tokens", P.DEFAULT_PARAMS["max_new_tokens"])
        row = wire.encode_job(key, item, stream)
        entry = self.ledger.accept(client, item.id, row, now, budget, tier)
        if self.placing:
            prompt = item.prompt
            if type(prompt) is str and len(prompt) < self.keyless_chars and item.messages is None:
                entry.tokens = len(prompt) // placement.BYTES_PER_TOKEN  # the common case
            else:
                facts = placement.prompt_facts(prompt, item.messages, self.key_bytes)
                if facts.key is None:
                    entry.tokens = facts.tokens
                else:
                    self.ledger.note_prompt(entry, facts.key, facts.tokens, facts.shared)
        if item.timeout_s is not None:
            self.deadlines.add(entry, item.timeout_s)
        self.queue.push(client, entry.key, budget, tier)

    # --- sessions ----------------------------------------------------------------

    def hello(self, record: ClientRecord, body: dict[str, Any], req: str | None) -> None:
        name, host, pid = body.get("name"), body.get("host"), body.get("pid")
        if isinstance(name, str):
            record.name = name[: P.MAX_CLIENT_NAME_CHARS]
        if isinstance(host, str):
            record.host = host[: P.MAX_CLIENT_NAME_CHARS]
        if type(pid) is int:
            record.pid = pid
        welcome = {
            "req": req,
            "instance": self.service.instance,
            "session": record.session,
            "client": record.identity.hex(),
            "model": self.service.model_name,
            "engine": self.rooms.table.engine,
            "limits": {
                "max_items_per_submit": P.MAX_ITEMS_PER_SUBMIT,
                "max_message_bytes": P.MAX_MESSAGE_BYTES,
                "results_message_bytes": self.settings.results_message_bytes,
                "unread_budget_bytes": self.settings.unread_budget_bytes,
                "client_grace_s": self.settings.client_grace_s,
            },
        }
        self.outbox.reply(record.identity, P.WELCOME, welcome)
