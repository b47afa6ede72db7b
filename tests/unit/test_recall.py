"""A client found unreachable has its running items taken back from every worker
(router._recall_lost), slot 0's included: what it never reads is not run to the end.
In-process, over the router model's fake sockets."""

from __future__ import annotations

import time

from exgen.client import protocol as P
from exgen.daemon import wire
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Finished
from exgen.daemon.router import Router
from exgen.daemon.slots import Slot, SlotTable
from tests.unit.test_router_model import FakeProc, FakeSocket

CAPACITY = 4
CLIENT = b"c-1"


def a_router_with_two_busy_workers() -> tuple[Router, FakeSocket, FakeSocket, SlotTable]:
    frontend, backend = FakeSocket(), FakeSocket()
    table = SlotTable([Slot(i, None) for i in range(2)])
    router = Router(Settings(), frontend, backend, table)
    for slot in table:
        slot.proc = FakeProc(1000 + slot.id)
        ready = wire.Ready(slot.id, 1000 + slot.id, "synthetic", CAPACITY, None, 0.0, {})
        backend.inbound.append([f"w{slot.id}".encode(), *wire.pack_ready(ready)])
    router.handle_backend(time.monotonic())
    items = [{"id": str(i), "prompt": f"p{i}"} for i in range(40)]
    frontend.inbound.append([CLIENT, *P.pack(P.SUBMIT, {"req": "r1", "items": items})])
    router.handle_frontend(time.monotonic())
    router.dispatch()
    return router, frontend, backend, table


def test_an_unreachable_clients_items_are_taken_back_from_every_slot():
    router, frontend, backend, table = a_router_with_two_busy_workers()
    held = {slot.id: len(router.ledger.held_by(slot.id)) for slot in table}
    assert all(n >= CAPACITY for n in held.values()), f"both workers busy first: {held}"
    for slot in table:
        backend.take(slot.serving.identity)  # the WORK messages: not what this test reads

    frontend.gone.add(CLIENT)  # its process stopped: ZMQ dropped the connection
    first = sorted(router.ledger.held_by(0))[0]
    done = [Finished(first, "x", P.FINISH_LENGTH, 1, 1)]  # slot 0 answers one item
    backend.inbound.append([table.get(0).serving.identity, *wire.pack_done(done, [])])
    router.handle_backend(time.monotonic())
    router.flush_results()  # the result cannot go: the client is found unreachable

    assert router.ledger.inflight == 0, {s.id: router.ledger.held_by(s.id) for s in table}
    for slot in table:
        cancels = [body for cmd, body in backend.take(slot.serving.identity) if cmd == wire.CANCEL]
        assert cancels, f"slot {slot.id} was never told to drop the client's items"
    assert router.queue.size == 40 - 1, "the taken-back items wait again, unanswered"
