"""The router places by prefix and by cost: plain data in, WORK messages out
(router_support.Network); a dead worker's prefixes are forgotten; staged items are
cancelled, counted and handed back like any other waiting item."""

from __future__ import annotations

import time
from typing import Any

import pytest

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.engines.base import Finished
from exgen.daemon.net import wire
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network

CLIENT = b"c-1"
FEW_SHOT = [f"Few-shot block {p}. " + "Question: 2 + 2? Answer: 4. " * 30 for p in range(4)]


def a_router(workers: int, **settings: Any) -> tuple[Router, Network, list[bytes]]:
    table = SlotTable([Slot(i, None) for i in range(workers)])
    router = Router(Settings(**settings), table)
    net = Network(router)
    identities = [net.worker_ready(table.by_id[i], 1000 + i, capacity=4) for i in range(workers)]
    return router, net, identities


def submit(net: Network, items: list[dict[str, Any]], client: bytes = CLIENT) -> None:
    net.client_says(client, P.SUBMIT, {"req": "r", "items": items})
    net.take_client(client)


def sent_prompts(net: Network, identity: bytes) -> list[str]:
    out = []
    for command, body in net.take_worker(identity):
        if command == wire.WORK:
            out += [job.prompt for job in wire.decode_work(body)]
    return out


def dispatch(router: Router, net: Network) -> None:
    router.dispatch(time.monotonic())
    net.send()


def finish_all(router: Router, net: Network, identity: bytes, keys: list[int]) -> None:
    done = [Finished(k, "t", "length", 1, 1, cached_tokens=300) for k in keys]
    net.worker_says(identity, wire.pack_done(done, []))


def test_each_prefix_stays_on_one_worker_and_the_prefixes_spread():
    router, net, workers = a_router(4)
    items = [
        {"id": f"{p}-{i}", "prompt": FEW_SHOT[p] + f"q{i}", "params": {"max_new_tokens": 4}}
        for i in range(6)
        for p in range(4)
    ]  # interleaved: 0, 1, 2, 3, 0, 1, ...
    submit(net, items)
    dispatch(router, net)
    homes = []
    for identity in workers:
        prompts = sent_prompts(net, identity)
        assert len(prompts) == 6  # capacity 4 + prefetch 2
        homes.append({p[: len("Few-shot block 0")] for p in prompts})
    assert all(len(h) == 1 for h in homes) and len(set.union(*homes)) == 4


def test_a_prefix_comes_back_to_its_worker_as_it_frees_up():
    router, net, workers = a_router(2)
    first = [{"id": f"a{i}", "prompt": FEW_SHOT[0] + f"q{i}"} for i in range(6)]
    submit(net, first)
    dispatch(router, net)
    holder = next(w for w in workers if sent_prompts(net, w))
    other = next(w for w in workers if w != holder)
    finish_all(router, net, holder, list(router.ledger.held_by(workers.index(holder))))
    submit(net, [{"id": f"b{i}", "prompt": FEW_SHOT[0] + f"r{i}"} for i in range(3)])
    dispatch(router, net)
    assert len(sent_prompts(net, holder)) == 3 and sent_prompts(net, other) == []
    assert router.dispatcher.affinity.cached  # learned from cached_tokens


def test_results_carry_cached_tokens():
    router, net, workers = a_router(1)
    submit(net, [{"id": "x", "prompt": FEW_SHOT[0]}])
    dispatch(router, net)
    finish_all(router, net, workers[0], [0])
    router.flush_results(time.monotonic())
    net.send()
    results = [b for c, b in net.take_client(CLIENT) if c == P.RESULTS]
    assert results[0]["results"][0]["cached_tokens"] == 300


def test_long_prompts_are_spread_over_the_workers():
    router, net, workers = a_router(2)
    long = "x" * 4000  # no shared prefix: different first bytes
    items = [{"id": f"l{i}", "prompt": f"{i} {long}"} for i in range(2)]
    items += [{"id": f"s{i}", "prompt": f"short {i}"} for i in range(10)]
    submit(net, items)
    dispatch(router, net)
    for identity in workers:
        assert sum(len(p) > 1000 for p in sent_prompts(net, identity)) == 1


def test_a_dead_workers_prefixes_are_forgotten():
    router, net, _ = a_router(2)
    submit(net, [{"id": f"a{i}", "prompt": FEW_SHOT[0] + f"q{i}"} for i in range(4)])
    dispatch(router, net)
    holder = next(iter(router.dispatcher.affinity.holders.values()))
    (slot_id,) = holder
    router.on_worker_exit(slot_id, 1000 + slot_id, "killed", True, time.monotonic())
    assert router.dispatcher.affinity.holders == {}
    assert router.queue.size == 4  # back to wait


def test_staged_items_are_cancelled_and_handed_back():
    router, net, _ = a_router(1)
    items = [{"id": f"a{i}", "prompt": FEW_SHOT[i % 2] + f"q{i}"} for i in range(20)]
    submit(net, items)
    dispatch(router, net)
    assert router.queue.staged_count == 14 and router.queue.size == 14
    net.client_says(CLIENT, P.CANCEL, {"req": "c", "ids": ["a12", "a13"]})
    assert router.queue.size == router.queue.staged_count == 12
    router.start_draining()
    net.send()
    assert router.queue.size == 0 and router.queue.staged_count == 0
    errors = [b for c, b in net.take_client(CLIENT) if c == P.ERROR and b.get("items")]
    assert sum(len(b["items"]) for b in errors) == 12


def test_count_placement_is_the_balancing_before():
    router, net, workers = a_router(2, placement="count")
    submit(net, [{"id": f"a{i}", "prompt": FEW_SHOT[0] + f"q{i}"} for i in range(4)])
    dispatch(router, net)
    assert [len(sent_prompts(net, w)) for w in workers] == [2, 2]
    assert router.queue.staged_count == 0


def _work_sent(net: Network, identities: list[bytes]) -> list[list[str]]:
    return [sent_prompts(net, identity) for identity in identities]


def test_the_keyless_path_decides_what_the_staging_area_decides():
    """No open item has a prefix key: the dispatcher skips the staging area, and every
    round of WORK is what plan_placement would have sent, item for item."""
    runs = []
    for keyless_path in (True, False):
        router, net, workers = a_router(3)
        router.dispatcher.keyless_path = keyless_path
        items = [
            {"id": f"i{i}", "prompt": "w " * (i * 37 % 50), "params": {"max_new_tokens": 1 + i % 7}}
            for i in range(40)
        ]
        submit(net, items)
        rounds = []
        for _ in range(6):
            dispatch(router, net)
            sent = _work_sent(net, workers)
            rounds.append(sent)
            for identity, prompts in zip(workers, sent, strict=True):
                if prompts:  # the slot finishes its first item
                    slot = router.table.serving_identity(identity)
                    assert slot is not None
                    key = min(router.ledger.held_by(slot.id))
                    finish_all(router, net, identity, [key])
        assert router.ledger.keyed == 0
        runs.append(rounds)
    assert runs[0] == runs[1]
    assert sum(len(p) for r in runs[0] for p in r) > 30


def test_keyed_items_are_counted_until_answered():
    router, net, workers = a_router(1)
    submit(net, [{"id": f"a{i}", "prompt": FEW_SHOT[0] + f"q{i}"} for i in range(2)])
    assert router.ledger.keyed == 2
    dispatch(router, net)
    finish_all(router, net, workers[0], sorted(router.ledger.held_by(0)))
    assert router.ledger.keyed == 0


def test_a_prefixs_last_items_wait_for_the_first_holder_to_free_a_slot():
    # Capacity 4, prefetch 2. Worker 0 takes the prefix with 6 (4 + 2); worker 1 takes
    # it up past the slack, but the 6 left are its last batch: worker 1 fills to its
    # capacity only, and 2 wait for whichever holder frees a slot first.
    router, net, workers = a_router(2)
    submit(net, [{"id": f"a{i}", "prompt": FEW_SHOT[0] + f"q{i}"} for i in range(12)])
    dispatch(router, net)
    counts = sorted(len(sent_prompts(net, w)) for w in workers)
    assert counts == [4, 6] and router.queue.staged_count == 2
    first = min(workers, key=lambda w: len(router.ledger.held_by(workers.index(w))))
    slot = workers.index(first)
    finish_all(router, net, first, sorted(router.ledger.held_by(slot))[:2])
    dispatch(router, net)
    assert len(sent_prompts(net, first)) == 2 and router.queue.staged_count == 0


@pytest.mark.parametrize("placement", ["prefix", "count"])
def test_the_worker_that_ends_its_batch_first_does_not_take_the_others_next(placement):
    """Near a job's end, a worker ending a whole batch at once gets its next batch, not
    a batch of prefetch too: the waiting items are no more than the workers can run
    at once, so the other worker, ending its batch a moment later, gets its share."""
    router, net, workers = a_router(2, placement=placement)  # capacity 4, prefetch 2
    submit(
        net, [{"id": str(i), "prompt": f"p{i}", "params": {"max_new_tokens": 4}} for i in range(20)]
    )
    dispatch(router, net)
    first = {w: work_keys(net, w) for w in workers}
    assert [len(keys) for keys in first.values()] == [6, 6]  # 8 wait: two batches
    finish(net, workers[1], first[workers[1]][:4])  # a whole batch ends at once
    dispatch(router, net)
    assert len(work_keys(net, workers[1])) == 4, "took the other worker's next batch"
    finish(net, workers[0], first[workers[0]][:4])
    dispatch(router, net)
    assert len(work_keys(net, workers[0])) == 4


def work_keys(net: Network, identity: bytes) -> list[int]:
    return [
        job.key
        for command, body in net.take_worker(identity)
        if command == wire.WORK
        for job in wire.decode_work(body)
    ]


def finish(net: Network, identity: bytes, keys: list[int]) -> None:
    done = [Finished(k, "t", "length", 1, 4) for k in keys]
    net.worker_says(identity, wire.pack_done(done, []))
