"""A worker's DONE message, read by the router: typed rows in, each result built once
from its row (wire.DoneRow), a malformed message logged and dropped without costing
the router or anyone's work. Plain data in, messages out (router_support.Network)."""

from __future__ import annotations

import logging
import time

import msgpack
import pytest

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Choice, Finished, PromptEcho
from exgen.daemon.net import wire
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network

CLIENT = b"c-1"


# A row whose extra is nested 100,000 lists deep, packed by hand (msgpack's own packer
# refuses to go that deep): past msgspec's recursion limit.
DEEP_ROW = (
    b"\x96" + msgpack.packb([0, "t", "length", 1, 1])[1:]
    + b"\x81" + msgpack.packb("logprobs") + b"\x91" * 100_000 + b"\xc0"
)  # fmt: skip


def a_router_running(items: int) -> tuple[Router, Network, bytes]:
    table = SlotTable([Slot(0, None)])
    router = Router(Settings(), table)
    net = Network(router)
    worker = net.worker_ready(table.by_id[0], 1000, capacity=8)
    batch = [{"id": str(i), "prompt": f"p{i}"} for i in range(items)]
    net.client_says(CLIENT, P.SUBMIT, {"req": "r1", "items": batch})
    net.take_client(CLIENT)  # ACCEPTED
    router.dispatch(time.monotonic())
    net.send()
    return router, net, worker


def results(router: Router, net: Network) -> list[dict]:
    router.flush_results(time.monotonic())
    net.send()
    return [r for command, body in net.take_client(CLIENT) if command == P.RESULTS
            for r in body["results"]]  # fmt: skip


def test_a_result_is_built_from_its_row_with_every_extra_field():
    router, net, worker = a_router_running(2)
    lp = [["a", -0.5, [["a", -0.5], ["b", -1.5]]]]
    rich = Finished(
        0, "ab", P.FINISH_STOP, 7, 4, lp,
        [Choice("ab", P.FINISH_STOP, 2, lp), Choice("ba", P.FINISH_LENGTH, 2, None)],
        PromptEcho([1, 2], "p0", [None, -0.25]), cached_tokens=5,
    )  # fmt: skip
    net.worker_says(worker, wire.pack_done([rich, Finished(1, "x", P.FINISH_LENGTH, 2, 1)], []))
    first, second = sorted(results(router, net), key=lambda r: r["id"])
    assert first == {
        "id": "0", "text": "ab", "finish_reason": P.FINISH_STOP, "prompt_tokens": 7,
        "completion_tokens": 4, "slot": 0, "error": None, "cached_tokens": 5, "logprobs": lp,
        "choices": [c.to_wire() for c in rich.choices or []],
        "prompt": {"ids": [1, 2], "text": "p0", "logprobs": [None, -0.25]},
    }  # fmt: skip
    assert second == {
        "id": "1", "text": "x", "finish_reason": P.FINISH_LENGTH, "prompt_tokens": 2,
        "completion_tokens": 1, "slot": 0, "error": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    "row",
    [
        msgpack.packb([0, 5, "length", 1, 1, None]),  # text not a string
        msgpack.packb([0, "t", "length", "1", 1, None]),  # a count not an int
        msgpack.packb([0, "t", "length", 1]),  # too short
        msgpack.packb([0, "t", "length", 1, 1, {"choices": [{"nonsense": 1}]}]),  # no sample
        DEEP_ROW,
    ],
    ids=["text", "count", "short", "sample", "deep"],
)
def test_a_malformed_done_is_logged_and_the_router_goes_on(row, caplog):
    router, net, worker = a_router_running(1)
    body = b"\x82" + msgpack.packb("done") + b"\x91" + row
    body += msgpack.packb("failed") + b"\x90"
    with caplog.at_level(logging.ERROR, logger="exgen.worker_messages"):
        net.worker_says(worker, [bytes(P.MAGIC) + bytes([P.PROTOCOL_VERSION]), wire.DONE, body])
    assert "bad b'd' message from a worker" in caplog.text
    assert results(router, net) == []
    assert router.ledger.held_by(0) == {0}  # still owed, still running

    net.worker_says(worker, wire.pack_done([Finished(0, "fine", P.FINISH_LENGTH, 1, 1)], []))
    assert [(r["id"], r["text"]) for r in results(router, net)] == [("0", "fine")]
