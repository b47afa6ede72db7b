"""Hedging the tail: the pure policy (``hedging.plan_hedges``), then the router
in-process (router_support.Network): copies go to idle workers only once nothing
waits, the first answer wins and the other copy is cancelled, a crash of either
holder neither loses nor duplicates an answer, streaming items are never copied."""

from __future__ import annotations

import time
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Chunk, Finished
from exgen.daemon.net import wire
from exgen.daemon.router.hedging import Candidate, plan_hedges
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network

CLIENT = b"c-1"

# --- the policy ------------------------------------------------------------------------


def test_nothing_is_planned_without_an_idle_worker_or_a_candidate():
    assert plan_hedges([], [Candidate(1, 0, 0.0)]) == {}
    assert plan_hedges([(1, 4)], []) == {}


def test_the_oldest_items_go_first_up_to_capacity():
    candidates = [Candidate(k, 0, float(10 - k)) for k in range(10)]  # key 9 is oldest
    assert plan_hedges([(1, 3)], candidates) == {1: [9, 8, 7]}


def test_two_idle_workers_share_the_tail():
    candidates = [Candidate(k, 0, float(k)) for k in range(4)]
    plan = plan_hedges([(1, 4), (2, 4)], candidates)
    assert sorted(plan[1] + plan[2]) == [0, 1, 2, 3]
    assert len(plan[1]) == len(plan[2]) == 2


def test_a_worker_never_gets_a_copy_of_its_own_item():
    candidates = [Candidate(1, 1, 0.0), Candidate(2, 0, 1.0)]
    assert plan_hedges([(1, 4)], candidates) == {1: [2]}


# --- the router in-process ---------------------------------------------------------------


def a_router(workers: int, hedge: bool = True) -> tuple[Router, Network, list[bytes]]:
    table = SlotTable([Slot(i, None) for i in range(workers)])
    router = Router(Settings(hedge=hedge), table)
    net = Network(router)
    identities = [net.worker_ready(table.by_id[i], 1000 + i, capacity=2) for i in range(workers)]
    return router, net, identities


def submit(net: Network, n: int, stream: bool = False) -> None:
    items = [{"id": f"i{i}", "prompt": f"prompt {i}"} for i in range(n)]
    body: dict[str, Any] = {"req": "r", "items": items}
    if stream:
        body["stream"] = True
    net.client_says(CLIENT, P.SUBMIT, body)
    net.take_client(CLIENT)


def step(router: Router, net: Network) -> None:
    router.dispatch(time.monotonic())
    net.send()


def work_keys(net: Network, identity: bytes) -> list[int]:
    return [
        j.key for c, b in net.take_worker(identity) if c == wire.WORK for j in wire.decode_work(b)
    ]


def cancelled(net: Network, identity: bytes) -> list[int]:
    return [
        k for c, b in net.take_worker(identity) if c == wire.CANCEL for k in wire.decode_cancel(b)
    ]


def finish(net: Network, identity: bytes, keys: list[int]) -> None:
    done = [Finished(k, f"text {k}", "length", 1, 1) for k in keys]
    net.worker_says(identity, wire.pack_done(done, []))


def answers(router: Router, net: Network) -> list[str]:
    router.flush_results(time.monotonic())
    net.send()
    ids = []
    for command, body in net.take_client(CLIENT):
        if command == P.RESULTS:
            ids += [r["id"] for r in body["results"]]
    return ids


def tail(router: Router, net: Network, workers: list[bytes]) -> tuple[list[int], list[int]]:
    """Four items on two workers of capacity 2; worker 1 finishes its two: it idles
    while worker 0 still runs its two."""
    submit(net, 4)
    step(router, net)
    first, second = work_keys(net, workers[0]), work_keys(net, workers[1])
    assert len(first) == len(second) == 2
    finish(net, workers[1], second)
    step(router, net)
    return first, second


def test_an_idle_worker_copies_the_running_items_once_nothing_waits():
    router, net, workers = a_router(2)
    first, _ = tail(router, net, workers)
    assert sorted(work_keys(net, workers[1])) == sorted(first)
    assert router.ledger.hedges == 2
    step(router, net)  # no third copy
    assert work_keys(net, workers[0]) == [] and work_keys(net, workers[1]) == []


def test_no_copies_while_items_wait_or_with_hedging_off():
    router, net, workers = a_router(2, hedge=False)
    tail(router, net, workers)
    assert work_keys(net, workers[1]) == [] and router.ledger.hedges == 0
    router, net, workers = a_router(2)
    submit(net, 10)  # 2 × (capacity 2 + prefetch 2) = 8 go, 2 wait
    step(router, net)
    keys0, keys1 = work_keys(net, workers[0]), work_keys(net, workers[1])
    finish(net, workers[1], keys1)
    step(router, net)
    assert not set(work_keys(net, workers[1])) & set(keys0)  # the waiting two, no copies
    assert router.ledger.hedges == 0


def test_the_first_answer_wins_and_the_other_copy_is_cancelled():
    router, net, workers = a_router(2)
    first, _ = tail(router, net, workers)
    work_keys(net, workers[1])
    answers(router, net)
    finish(net, workers[1], [first[0]])  # the copy answers first
    assert cancelled(net, workers[0]) == [first[0]]
    finish(net, workers[0], first)  # the original's late answer is dropped
    assert cancelled(net, workers[1]) == [first[1]]
    finish(net, workers[1], [first[1]])  # too late: already answered
    got = answers(router, net)
    assert sorted(got) == sorted(f"i{k}" for k in first)
    assert router.ledger.hedge_wins == 1 and len(router.ledger) == 0
    assert router.ledger.inflight == 0 and not any(router.ledger.held_cost.values())


def test_a_dead_holder_leaves_the_item_to_its_copy():
    for dead in (0, 1):
        router, net, workers = a_router(2)
        first, _ = tail(router, net, workers)
        work_keys(net, workers[1])
        answers(router, net)
        router.on_worker_exit(dead, 1000 + dead, "killed", True, time.monotonic())
        assert router.queue.size == 0  # nothing requeued: the other copy runs
        alive = workers[1 - dead]
        assert all(router.ledger.holders(k) == [1 - dead] for k in first)
        finish(net, alive, first)
        assert sorted(answers(router, net)) == sorted(f"i{k}" for k in first)
        assert len(router.ledger) == 0 and router.ledger.inflight == 0


def test_both_holders_dead_requeues_the_item_once():
    router, net, workers = a_router(3)
    submit(net, 6)
    step(router, net)
    keys = [work_keys(net, w) for w in workers]
    finish(net, workers[2], keys[2])
    step(router, net)
    copies = work_keys(net, workers[2])
    assert copies
    now = time.monotonic()
    for slot in (0, 1):
        router.on_worker_exit(slot, 1000 + slot, "killed", True, now)
    copied = set(copies)
    assert router.queue.size == len(keys[0]) + len(keys[1]) - len(copied)
    assert all(router.ledger.holders(k) == [2] for k in copied)


def test_a_cancel_reaches_both_copies():
    router, net, workers = a_router(2)
    first, _ = tail(router, net, workers)
    work_keys(net, workers[1])
    answers(router, net)
    net.client_says(CLIENT, P.CANCEL, {"req": "c", "ids": [f"i{first[0]}"]})
    assert cancelled(net, workers[0]) == [first[0]]
    assert cancelled(net, workers[1]) == [first[0]]


def test_streaming_items_are_never_copied():
    router, net, workers = a_router(2)
    submit(net, 4, stream=True)
    step(router, net)
    first, second = work_keys(net, workers[0]), work_keys(net, workers[1])
    finish(net, workers[1], second)
    step(router, net)
    assert work_keys(net, workers[1]) == [] and router.ledger.hedges == 0
    chunks = [Chunk(first[0], "tok", 1, 1)]
    net.worker_says(workers[0], wire.pack_chunks(chunks))
    assert [c for c, _ in net.take_client(CLIENT)] == [P.CHUNKS]
