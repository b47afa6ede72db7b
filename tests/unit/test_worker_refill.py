"""The worker's wait for the router's refill between engine steps (pure function)."""

from __future__ import annotations

from exgen.daemon.worker import REFILL_WAIT_MAX_MS, refill_wait_ms


def test_no_wait_when_nothing_finished_or_the_engine_is_full() -> None:
    assert refill_wait_ms(1000.0, finished=False, pending=2, capacity=16) == 0.0
    assert refill_wait_ms(1000.0, finished=True, pending=16, capacity=16) == 0.0


def test_waits_a_small_share_of_a_step_for_room_to_refill() -> None:
    assert refill_wait_ms(100.0, finished=True, pending=2, capacity=16) == 5.0


def test_long_steps_wait_at_most_the_cap() -> None:
    assert refill_wait_ms(60_000.0, finished=True, pending=0, capacity=16) == REFILL_WAIT_MAX_MS
