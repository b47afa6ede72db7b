"""A client found unreachable has its running items taken back from every worker
(``Dispatcher.take_back``), slot 0's included: what it never reads is not run to the
end. In-process, plain data in and messages out (router_support.Network)."""

from __future__ import annotations

import time

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Finished
from exgen.daemon.net import wire
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network

CAPACITY = 4
CLIENT = b"c-1"


def a_router_with_two_busy_workers() -> tuple[Router, Network, SlotTable]:
    table = SlotTable([Slot(i, None) for i in range(2)])
    router = Router(Settings(), table)
    net = Network(router)
    for slot in table:
        net.worker_ready(slot, 1000 + slot.id, CAPACITY)
    items = [{"id": str(i), "prompt": f"p{i}"} for i in range(40)]
    net.client_says(CLIENT, P.SUBMIT, {"req": "r1", "items": items})
    router.dispatch(time.monotonic())
    net.send()
    return router, net, table


def test_an_unreachable_clients_items_are_taken_back_from_every_slot():
    router, net, table = a_router_with_two_busy_workers()
    held = {slot.id: len(router.ledger.held_by(slot.id)) for slot in table}
    assert all(n >= CAPACITY for n in held.values()), f"both workers busy first: {held}"
    for slot in table:
        net.take_worker(slot.serving.identity)  # the WORK messages: not what this test reads

    net.gone.add(CLIENT)  # its process stopped: ZMQ dropped the connection
    first = sorted(router.ledger.held_by(0))[0]
    done = [Finished(first, "x", P.FINISH_LENGTH, 1, 1)]  # slot 0 answers one item
    net.worker_says(table.get(0).serving.identity, wire.pack_done(done, []))
    router.flush_results(time.monotonic())
    net.send()  # the result cannot go: the client is found unreachable

    assert router.ledger.inflight == 0, {s.id: router.ledger.held_by(s.id) for s in table}
    for slot in table:
        sent = net.take_worker(slot.serving.identity)
        cancels = [body for cmd, body in sent if cmd == wire.CANCEL]
        assert cancels, f"slot {slot.id} was never told to drop the client's items"
    assert router.queue.size == 40 - 1, "the taken-back items wait again, unanswered"
