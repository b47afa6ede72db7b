"""The router's pending queue: fair across clients, requeued items first."""

from __future__ import annotations

from exgen.daemon.router.fairqueue import FairQueue


def test_clients_are_served_in_turn():
    queue = FairQueue()
    for key in range(100):
        queue.push(b"big", key)
    queue.push(b"small", 1000)
    taken = queue.take(4)
    assert 1000 in taken, "a one-item client waits behind a 100-item one"
    assert queue.size == 97


def test_order_within_a_client_is_kept():
    queue = FairQueue()
    for key in range(10):
        queue.push(b"a", key)
    assert queue.take(3) == [0, 1, 2]
    assert queue.take(100) == [3, 4, 5, 6, 7, 8, 9]
    assert queue.size == 0
    assert queue.take(5) == []


def test_requeued_items_go_first_in_their_order():
    queue = FairQueue()
    for key in range(5):
        queue.push(b"a", key)
    queue.push_front([50, 51])
    assert queue.take(3) == [50, 51, 0]


def test_shares_are_equal_between_busy_clients():
    queue = FairQueue()
    for key in range(100):
        queue.push(b"a", key)
        queue.push(b"b", 1000 + key)
    taken = queue.take(20)
    assert sum(1 for k in taken if k < 1000) == 10


def test_remove_and_drain():
    queue = FairQueue()
    for key in range(6):
        queue.push(b"a" if key % 2 else b"b", key)
    queue.push_front([9])
    queue.remove({1, 2, 9})
    assert queue.size == 4
    assert sorted(queue.drain_all()) == [0, 3, 4, 5]
    assert queue.size == 0


def test_a_larger_token_budget_starts_first_and_equal_budgets_keep_their_order():
    queue = FairQueue()
    budgets = {0: 10, 1: 10, 2: 1000, 3: 50, 4: 1000, 5: 10}
    for key, budget in budgets.items():
        queue.push(b"a", key, budget)
    assert queue.take(3) == [2, 4, 3]
    queue.push(b"a", 6, 500)  # a later arrival still goes by its budget
    assert queue.take(10) == [6, 0, 1, 5]
    assert queue.size == 0


def test_fifo_order_ignores_budgets():
    queue = FairQueue(longest_first=False)
    for key, budget in enumerate([10, 1000, 50]):
        queue.push(b"a", key, budget)
    assert queue.take(3) == [0, 1, 2]


def test_longest_first_stays_within_a_client_and_round_robin_holds():
    queue = FairQueue()
    for key in range(10):
        queue.push(b"big", key, 1000)
    queue.push(b"small", 100, 5)  # a short budget in another lane is not held back
    assert 100 in queue.take(2)


def test_remove_keeps_the_budget_order_of_what_is_left():
    queue = FairQueue()
    budgets = {0: 5, 1: 500, 2: 50, 3: 5000}
    for key, budget in budgets.items():
        queue.push(b"a", key, budget)
    queue.remove({3})
    assert queue.drain_all() == [1, 2, 0]
