"""What a client's message does: submit (refuse or accept), cancel, status, ping.

Admission decides; the router's sockets carry the answers. Refusals come before
validation where they can: under a flood, checking thousands of items only to
answer "busy" would become the router's main work.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from exgen.client import protocol as P
from exgen.daemon import wire

if TYPE_CHECKING:
    from exgen.daemon.router import Router

logger = logging.getLogger("exgen.admission")


class Admission:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.settings = router.settings
        self.ledger = router.ledger
        self.queue = router.queue

    def client_message(self, frames: list[bytes], now: float) -> None:
        router = self.router
        if len(frames) < 2:
            router.garbage_frames += 1
            return
        client, rest = frames[0], frames[1:]
        try:
            command, body = P.unpack(rest)
        except P.FrameError as exc:
            self._on_bad_frames(client, rest, exc)
            return
        router.clients.seen(client, now)
        req = body.get("req") if isinstance(body.get("req"), str) else None
        try:
            if command == P.SUBMIT:
                self.submit(client, body, now)
            elif command == P.CANCEL:
                self.cancel(client, body)
            elif command == P.STATUS:
                router.reply(client, P.STATUS_REPLY, {**router.status(now), "req": req})
            elif command == P.PING:
                pong = {"req": req, "instance": router.instance, "draining": router.draining}
                router.reply(client, P.PONG, pong)
            else:
                router.reply_error(
                    client, P.E_BAD_REQUEST, f"unknown command {command!r}", req=req
                )
        except P.ValidationError as exc:
            router.reply_error(
                client, P.E_BAD_REQUEST, exc.message, req=req, field_name=exc.field
            )

    def _on_bad_frames(self, client: bytes, frames: list[bytes], exc: P.FrameError) -> None:
        """Garbage is dropped; a peer that speaks our protocol badly is told why."""
        self.router.garbage_frames += 1
        if frames and frames[0][:3] == P.MAGIC:
            self.router.reply_error(client, P.E_PROTOCOL, str(exc))
        else:
            logger.debug("dropped %d garbage frame(s) from a client", len(frames))

    # --- submit ------------------------------------------------------------------

    def submit(self, client: bytes, body: dict[str, Any], now: float) -> None:
        peeked = _peek_ids(body)
        if peeked is not None and self._refused(client, body["req"], peeked):
            return
        submit = P.validate_submit(body)
        if self._refused(client, submit.req, [item.id for item in submit.items]):
            return
        accepted = 0
        for item in submit.items:
            if self.ledger.knows(client, item.id):
                continue  # a resend of something we already have: answered once
            self._accept(client, item, submit.stream, now)
            accepted += 1
        router = self.router
        if submit.rejected:
            results = [
                P.result_error(i, P.E_BAD_REQUEST, e.message, e.field) for i, e in submit.rejected
            ]
            router.reply(client, P.RESULTS, {"req": submit.req, "results": results})
            self.ledger.failed += len(results)
        router.reply(
            client,
            P.ACCEPTED,
            {
                "req": submit.req,
                "n": accepted,
                "queued": self.queue.size,
                "instance": router.instance,
                "model": router.model_name,
            },
        )

    def _refused(self, client: bytes, req: str, ids: list[str]) -> bool:
        """Draining or busy: the items are handed back (the client library resends)."""
        router = self.router
        if router.draining:
            message = "the daemon is shutting down"
            router.reply_error(client, P.E_DRAINING, message, req=req, items=ids)
            return True
        if self._queue_full(client, len(ids)):
            message = f"queue full ({self.queue.size} items waiting)"
            router.reply_error(client, P.E_BUSY, message, req=req, items=ids)
            return True
        return False

    def _queue_full(self, client: bytes, n: int) -> bool:
        """Busy? The last tenth of the queue is kept for clients with nothing waiting,
        so one client flooding the queue full never locks a one-line request out."""
        limit = self.settings.max_queue
        if self.queue.waiting(client) == 0:
            limit += max(1, limit // 10)
        return self.queue.size + n > limit

    def _accept(self, client: bytes, item: P.Item, stream: bool, now: float) -> None:
        key = self.ledger.reserve_key()
        budget = item.params.get("max_new_tokens", P.DEFAULT_PARAMS["max_new_tokens"])
        entry = self.ledger.accept(client, item.id, wire.encode_job(key, item, stream), now, budget)
        self.queue.push(client, entry.key, budget, entry.tier)

    # --- cancel ------------------------------------------------------------------

    def cancel(self, client: bytes, body: dict[str, Any]) -> None:
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise P.ValidationError("ids", "must be a list of item ids")
        keys = {key for i in ids if (key := self.ledger.key_of(client, i)) is not None}
        entries = self.router.cancel_keys(keys)
        self.router.answer_with_error(
            self.ledger.finish(e.key for e in entries), P.E_CANCELLED, "cancelled by the client"
        )


def _peek_ids(body: dict[str, Any]) -> list[str] | None:
    """The item ids of a plausible submit, without validating the items; else None."""
    items = body.get("items")
    if not isinstance(body.get("req"), str) or not isinstance(items, list):
        return None
    if not items or len(items) > P.MAX_ITEMS_PER_SUBMIT:
        return None
    return [i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)]
