"""How the sends to a client went, reported back to the router (``Router.on_sent``):
results a full pipe refused go again, in order, once it drains; a client whose sends
find no connection is probed until its grace runs out, then its work is cancelled.
Plain data in, messages out (router_support.Network)."""

from __future__ import annotations

import time

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Finished
from exgen.daemon.net import wire
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network

CLIENT = b"c-1"


def a_router_with_one_worker(**settings: float) -> tuple[Router, Network, bytes]:
    table = SlotTable([Slot(0, None)])
    router = Router(Settings(**settings), table)  # type: ignore[arg-type]
    net = Network(router)
    worker = net.worker_ready(table.by_id[0], 1000, capacity=8)
    items = [{"id": str(i), "prompt": f"p{i}"} for i in range(4)]
    net.client_says(CLIENT, P.SUBMIT, {"req": "r1", "items": items})
    net.take_client(CLIENT)  # ACCEPTED
    router.dispatch(time.monotonic())
    net.send()
    return router, net, worker


def answer(router: Router, net: Network, worker: bytes, key: int) -> None:
    net.worker_says(worker, wire.pack_done([Finished(key, f"t{key}", "length", 1, 1)], []))
    router.flush_results(time.monotonic())
    net.send()


def test_results_a_full_pipe_refused_go_again_in_order():
    router, net, worker = a_router_with_one_worker()
    net.full.add(CLIENT)
    answer(router, net, worker, 0)
    answer(router, net, worker, 1)
    record = router.clients.get(CLIENT)
    assert record is not None and (record.seq, record.sent_upto) == (2, 0)
    assert net.take_client(CLIENT) == []

    net.full.discard(CLIENT)  # it reads again
    answer(router, net, worker, 2)
    got = net.take_client(CLIENT)
    assert [body["seq"] for command, body in got if command == P.RESULTS] == [1, 2, 3]
    assert record.sent_upto == 3 and record.unacked_since is not None


def test_a_client_gone_past_its_grace_loses_its_work():
    router, net, _ = a_router_with_one_worker(client_grace_s=1.0, client_heartbeat_s=0.5)
    net.gone.add(CLIENT)
    now = time.monotonic()
    for step in range(3):  # a probe finds it gone; the next ones, past the grace
        router.tick(now + 10 * (step + 1))
        net.send(now + 10 * (step + 1))
    assert router.clients.get(CLIENT) is None
    assert router.ledger.count_of(CLIENT) == 0 and router.ledger.abandoned == 4
