"""The loop's reading of client messages (server.RouterSockets) over real ZMQ sockets:
a turn reads on while every worker has work, and ends after the message that leaves a
worker idle with items waiting, so the first frame of a job starts the workers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.router.router import Router
from exgen.daemon.server import RouterSockets
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network

FRAMES = 5


@pytest.fixture
def sockets() -> Iterator[tuple[zmq.Socket, zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    frontend, backend, client = (
        ctx.socket(zmq.ROUTER),
        ctx.socket(zmq.ROUTER),
        ctx.socket(zmq.DEALER),
    )
    frontend.bind("inproc://front")
    backend.bind("inproc://back")
    client.connect("inproc://front")
    yield frontend, backend, client
    for sock in (frontend, backend, client):
        sock.close(linger=0)
    ctx.term()


def a_router(workers: int) -> Router:
    table = SlotTable([Slot(i, None) for i in range(workers)])
    router = Router(Settings(), table)
    net = Network(router)
    for i in range(workers):
        net.worker_ready(table.by_id[i], 1000 + i, capacity=4)
    return router


def send_submits(client: zmq.Socket, frontend: zmq.Socket) -> None:
    for f in range(FRAMES):
        body = {"req": f"r{f}", "items": [{"id": f"{f}", "prompt": "p"}]}
        client.send_multipart(P.pack(P.SUBMIT, body))
    deadline = time.monotonic() + 5
    while frontend.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0:
        assert time.monotonic() < deadline, "the submits never arrived"
        time.sleep(0.01)
    time.sleep(0.05)  # inproc: all of them are queued by now


def waiting(router: Router) -> int:
    return router.dispatcher.queue.dispatchable


def submits_read_once(sockets, workers: int) -> tuple[Router, RouterSockets]:
    """A router with ``workers`` serving, the submits sent, and one turn's reading."""
    frontend, backend, client = sockets
    router = a_router(workers)
    loop = RouterSockets(router, frontend, backend, inspect=False, curve=False)
    send_submits(client, frontend)
    loop.read_clients(time.monotonic())
    return router, loop


def test_a_turn_ends_after_the_message_that_leaves_a_worker_idle(sockets):
    router, loop = submits_read_once(sockets, 2)
    assert waiting(router) == 1, "read past a frame while workers sat idle"
    router.dispatch(time.monotonic())  # the rest of the loop's turn
    loop.read_clients(time.monotonic())
    assert waiting(router) == 1  # one worker still idle: again one frame
    router.dispatch(time.monotonic())
    assert not router.starving()  # both workers hold an item
    loop.read_clients(time.monotonic())
    assert waiting(router) == FRAMES - 2, "a turn stopped with every worker busy"


def test_with_no_worker_serving_a_turn_reads_every_message(sockets):
    router, _ = submits_read_once(sockets, 0)
    assert waiting(router) == FRAMES
    assert not router.starving()


def test_a_worker_idle_for_affinitys_sake_is_not_starving_until_more_arrives():
    router = a_router(2)  # capacity 4, prefetch 2
    net = Network(router)
    head = "Question: 2 + 2? Answer: 4. " * 40  # one prefix key for all of them
    items = [{"id": str(i), "prompt": head + f"q{i}"} for i in range(8)]
    net.client_says(b"c", P.SUBMIT, {"req": "r", "items": items})
    router.dispatch(time.monotonic())
    assert waiting(router) == 2  # for the prefix's holder: within affinity_slack
    assert not router.starving(), "reading would stop after every message meanwhile"
    other = {"id": "x", "prompt": "Something else entirely. " * 40}
    net.client_says(b"c", P.SUBMIT, {"req": "s", "items": [other]})
    assert router.starving()  # a new item the idle worker may take
