"""Cancelling: a client's own items, or (``exgen-client cancel``) another client's work.

Own items (``ids``, or ``all``) are answered ``cancelled`` to their client, whether
they waited or ran (the worker is told to drop them). Another client's work
(``client``: its name, pid or id; ``clients: "all"``) may be cancelled by local
users — on the ipc socket or loopback TCP without CURVE — and, over CURVE, only by a
client authenticated with the same key; otherwise the answer is ``forbidden``.
"""

from __future__ import annotations

import logging
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.net.sockets import is_loopback
from exgen.daemon.router.answers import Answers
from exgen.daemon.router.clients import ClientRecord, who
from exgen.daemon.router.dispatch import Dispatcher
from exgen.daemon.router.rooms import Rooms

logger = logging.getLogger("exgen.control")

LOCAL = "local"  # everyone who can reach the socket is a local user
CURVE = "curve"  # clients are who their CURVE key says
PEER = "peer"  # insecure TCP: only connections from loopback count as local
MIN_ID_PREFIX = 8  # hex digits of a client id that name it


class Cancels:
    def __init__(self, rooms: Rooms, dispatcher: Dispatcher, answers: Answers, access: str) -> None:
        self.ledger = rooms.ledger
        self.clients = rooms.clients
        self.outbox = rooms.outbox
        self.dispatcher = dispatcher
        self.answers = answers
        self.access = access  # who may cancel whom: LOCAL, CURVE or PEER

    def handle(
        self, caller: ClientRecord, body: dict[str, Any], req: str | None, now: float
    ) -> None:
        if body.get("client") is not None or body.get("clients") is not None:
            self._cancel_others(caller, body, req, now)
            return
        ledger = self.ledger
        if body.get("all") is True:
            keys = ledger.keys_of(caller.identity)
        else:
            ids = body.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise P.ValidationError("ids", "must be a list of item ids (or all: true)")
            keys = {k for i in ids if (k := ledger.key_of(caller.identity, i)) is not None}
        self.cancel(keys, "cancelled by the client", now)

    def cancel(self, keys: set[int], message: str, now: float) -> int:
        entries = self.dispatcher.withdraw(keys)
        finished = self.ledger.finish(e.key for e in entries)
        self.answers.fail(finished, P.E_CANCELLED, message, now)
        return len(finished)

    def _cancel_others(
        self, caller: ClientRecord, body: dict[str, Any], req: str | None, now: float
    ) -> None:
        targets = self._targets(caller, body)
        if not targets:
            raise P.ValidationError("client", f"no such client; connected: {self._names(caller)}")
        allowed = [t for t in targets if self.may_cancel(caller, t)]
        if not allowed:
            self.outbox.error(
                caller.identity,
                P.E_FORBIDDEN,
                "you may cancel only your own work (a CURVE client: work sent with its key)",
                req=req,
            )
            return
        by = who(caller)
        cancelled = 0
        for target in allowed:
            keys = self.ledger.keys_of(target.identity)
            cancelled += self.cancel(keys, f"cancelled by {by}", now)
            logger.info("client %s cancelled %d items of %s", by, len(keys), who(target))
        body = {"req": req, "cancelled": cancelled, "clients": [who(t) for t in allowed]}
        self.outbox.reply(caller.identity, P.CANCELLED, body)

    def _targets(self, caller: ClientRecord, body: dict[str, Any]) -> list[ClientRecord]:
        others = [r for r in self.clients if r.identity != caller.identity]
        if body.get("clients") == "all":
            return others
        if body.get("clients") is not None:
            raise P.ValidationError("clients", 'must be "all"')
        name = body.get("client")
        if not isinstance(name, str) or not name:
            raise P.ValidationError("client", "must be a client's name, pid or id")
        return [r for r in others if _matches(r, name)]

    def may_cancel(self, caller: ClientRecord, target: ClientRecord) -> bool:
        mode = self.access
        if mode == LOCAL:
            return True
        if mode == CURVE:
            return caller.user is not None and caller.user == target.user
        return caller.peer is not None and is_loopback(caller.peer)

    def _names(self, caller: ClientRecord) -> str:
        names = [who(r) for r in self.clients if r.identity != caller.identity]
        return ", ".join(names) or "none"


def _matches(record: ClientRecord, name: str) -> bool:
    if record.name == name or (record.pid is not None and str(record.pid) == name):
        return True
    return len(name) >= MIN_ID_PREFIX and record.identity.hex().startswith(name.lower())
