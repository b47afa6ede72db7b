"""Cancelling: a client's own items, or (``exgen-client cancel``) another client's work.

Own items (``ids``, or ``all``) are answered ``cancelled`` to their client, whether
they waited or ran (the worker is told to drop them). Another client's work
(``client``: its name, pid or id; ``clients: "all"``) may be cancelled by local
users — on the ipc socket or loopback TCP without CURVE — and, over CURVE, only by a
client authenticated with the same key; otherwise the answer is ``forbidden``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from exgen.client import protocol as P
from exgen.daemon.clients import ClientRecord
from exgen.daemon.sockets import is_loopback

if TYPE_CHECKING:
    from exgen.daemon.router import Router

logger = logging.getLogger("exgen.control")

LOCAL = "local"  # everyone who can reach the socket is a local user
CURVE = "curve"  # clients are who their CURVE key says
PEER = "peer"  # insecure TCP: only connections from loopback count as local
MIN_ID_PREFIX = 8  # hex digits of a client id that name it


class Cancels:
    def __init__(self, router: Router) -> None:
        self.router = router

    def handle(self, caller: ClientRecord, body: dict[str, Any], req: str | None) -> None:
        if body.get("client") is not None or body.get("clients") is not None:
            self._cancel_others(caller, body, req)
            return
        ledger = self.router.ledger
        if body.get("all") is True:
            keys = ledger.keys_of(caller.identity)
        else:
            ids = body.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise P.ValidationError("ids", "must be a list of item ids (or all: true)")
            keys = {k for i in ids if (k := ledger.key_of(caller.identity, i)) is not None}
        self.cancel(keys, "cancelled by the client")

    def cancel(self, keys: set[int], message: str) -> int:
        router = self.router
        entries = router.cancel_keys(keys)
        finished = router.ledger.finish(e.key for e in entries)
        router.answer_with_error(finished, P.E_CANCELLED, message)
        return len(finished)

    def _cancel_others(self, caller: ClientRecord, body: dict[str, Any], req: str | None) -> None:
        router = self.router
        targets = self._targets(caller, body)
        if not targets:
            raise P.ValidationError("client", f"no such client; connected: {self._names(caller)}")
        allowed = [t for t in targets if self.may_cancel(caller, t)]
        if not allowed:
            router.reply_error(
                caller.identity,
                P.E_FORBIDDEN,
                "you may cancel only your own work (a CURVE client: work sent with its key)",
                req=req,
            )
            return
        by = f"{caller.name or caller.identity.hex()[:12]}" + (
            f" (pid {caller.pid})" if caller.pid else ""
        )
        cancelled = 0
        for target in allowed:
            keys = router.ledger.keys_of(target.identity)
            cancelled += self.cancel(keys, f"cancelled by {by}")
            logger.info("client %s cancelled %d items of %s", by, len(keys), describe(target))
        body = {"req": req, "cancelled": cancelled, "clients": [describe(t) for t in allowed]}
        router.reply(caller.identity, P.CANCELLED, body)

    def _targets(self, caller: ClientRecord, body: dict[str, Any]) -> list[ClientRecord]:
        others = [r for r in self.router.clients if r.identity != caller.identity]
        if body.get("clients") == "all":
            return others
        if body.get("clients") is not None:
            raise P.ValidationError("clients", 'must be "all"')
        name = body.get("client")
        if not isinstance(name, str) or not name:
            raise P.ValidationError("client", "must be a client's name, pid or id")
        return [r for r in others if _matches(r, name)]

    def may_cancel(self, caller: ClientRecord, target: ClientRecord) -> bool:
        mode = self.router.access
        if mode == LOCAL:
            return True
        if mode == CURVE:
            return caller.user is not None and caller.user == target.user
        return caller.peer is not None and is_loopback(caller.peer)

    def _names(self, caller: ClientRecord) -> str:
        names = [describe(r) for r in self.router.clients if r.identity != caller.identity]
        return ", ".join(names) or "none"


def describe(record: ClientRecord) -> str:
    pid = f" pid {record.pid}" if record.pid else ""
    name = record.name or "unnamed"
    return f"{name}{pid} [{record.identity.hex()[:12]}]"


def _matches(record: ClientRecord, name: str) -> bool:
    if record.name == name or (record.pid is not None and str(record.pid) == name):
        return True
    return len(name) >= MIN_ID_PREFIX and record.identity.hex().startswith(name.lower())

