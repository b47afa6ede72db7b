"""The stale-acknowledgement clock (Delivery.update_pause, "not acknowledging"): a
client that acknowledges only part of what it was sent and then goes quiet has its
items held back after ``client_heartbeat_s``, just as one that acknowledges nothing.
In-process, plain data in and messages out (router_support.Network)."""

from __future__ import annotations

import time

from exgen.client import protocol as P
from exgen.daemon.engines.base import Finished
from exgen.daemon.net import wire
from exgen.daemon.router.router import Router
from tests.unit.router.router_support import Network
from tests.unit.router.test_recall import CLIENT, a_router_with_two_busy_workers


def answer_one_item_per_tick(router: Router, net: Network, ticks: int) -> None:
    """Each tick one worker answers one item, and the result goes out in its own
    RESULTS message (seq 1, 2, ...)."""
    for _ in range(ticks):
        slot = next(s for s in router.table if router.ledger.held_by(s.id))
        key = sorted(router.ledger.held_by(slot.id))[0]
        done = [Finished(key, "x", P.FINISH_LENGTH, 1, 1)]
        assert slot.serving is not None
        net.worker_says(slot.serving.identity, wire.pack_done(done, []))
        router.flush_results(time.monotonic())
        net.send()


def acknowledge(router: Router, net: Network, seq: int) -> None:
    record = router.clients.get(CLIENT)
    assert record is not None
    net.client_says(CLIENT, P.ACK, {"session": record.session, "seq": seq})


def pause_reason_after(router: Router, seconds: float) -> str:
    record = router.clients.get(CLIENT)
    assert record is not None
    router.delivery.update_pause(record, time.monotonic() + seconds)
    return record.pause_reason


def test_a_partial_ack_then_silence_still_holds_the_clients_items_back():
    router, net, _ = a_router_with_two_busy_workers()
    answer_one_item_per_tick(router, net, 3)
    record = router.clients.get(CLIENT)
    assert record is not None and record.sent_upto == 3

    acknowledge(router, net, 1)  # messages 2 and 3 were sent and are never acknowledged
    late = router.settings.client_heartbeat_s + 0.5
    assert pause_reason_after(router, late) == "not acknowledging"


def test_a_full_ack_stops_the_clock():
    router, net, _ = a_router_with_two_busy_workers()
    answer_one_item_per_tick(router, net, 3)
    acknowledge(router, net, 3)
    late = router.settings.client_heartbeat_s + 0.5
    assert pause_reason_after(router, late) == "", "it has everything it was sent"
