"""The balancing policy and back-off, as pure functions."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exgen.daemon import policy
from exgen.daemon.policy import WorkerLoad, plan_dispatch


def test_idle_workers_share_new_work_evenly():
    loads = [WorkerLoad(0, 0, 8), WorkerLoad(1, 0, 8), WorkerLoad(2, 0, 8), WorkerLoad(3, 0, 8)]
    assert plan_dispatch(loads, 8, prefetch=2) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_work_goes_to_the_least_loaded_worker():
    loads = [WorkerLoad(0, 6, 8), WorkerLoad(1, 1, 8)]
    assert plan_dispatch(loads, 3, prefetch=2) == {1: 3}


def test_no_worker_goes_past_capacity_plus_prefetch():
    loads = [WorkerLoad(0, 0, 4), WorkerLoad(1, 3, 4)]
    plan = plan_dispatch(loads, 1000, prefetch=2)
    assert plan == {0: 6, 1: 3}


def test_a_worker_ending_whole_batches_may_hold_the_next_batch():
    # Slot 0 reported batches of 8 ending together: its next batch waits on board.
    loads = [WorkerLoad(0, 0, 8, prefetch=8), WorkerLoad(1, 0, 8, prefetch=2)]
    assert plan_dispatch(loads, 1000, prefetch=2) == {0: 16, 1: 10}


def test_own_prefetch_never_takes_work_from_a_worker_below_capacity():
    # Water-filling: both reach capacity before slot 0 gets its larger prefetch.
    loads = [WorkerLoad(0, 0, 8, prefetch=8), WorkerLoad(1, 0, 8, prefetch=2)]
    assert plan_dispatch(loads, 16, prefetch=2) == {0: 8, 1: 8}


def test_prefetch_follows_how_many_jobs_end_together():
    assert policy.prefetch_for(2, 0.0, 32) == 2  # nothing seen yet: the base
    assert policy.prefetch_for(2, 1.4, 32) == 2  # jobs end one by one
    assert policy.prefetch_for(2, 12.0, 32) == 12
    assert policy.prefetch_for(2, 40.0, 32) == 32  # never more than one batch
    assert policy.prefetch_for(0, 0.0, 8) == 0


def test_a_batch_of_prefetch_comes_only_from_work_no_worker_could_start():
    assert policy.prefetch_for(2, 40.0, 32, spare=0) == 2  # the end of a job: the base
    assert policy.prefetch_for(2, 40.0, 32, spare=10) == 12
    assert policy.prefetch_for(2, 40.0, 32, spare=1000) == 32
    assert policy.prefetch_for(2, 1.0, 32, spare=1000) == 2


def test_full_workers_get_nothing():
    loads = [WorkerLoad(0, 10, 8), WorkerLoad(1, 11, 8)]
    assert plan_dispatch(loads, 5, prefetch=2) == {}


def test_load_is_relative_to_capacity():
    # A worker of capacity 32 at 8 is less loaded than one of capacity 8 at 4.
    loads = [WorkerLoad(0, 4, 8), WorkerLoad(1, 8, 32)]
    plan = plan_dispatch(loads, 10, prefetch=0)
    assert plan[1] > plan.get(0, 0)


@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 32), st.none() | st.integers(0, 32)),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 500),
    st.integers(0, 4),
)
def test_plan_invariants(triples, queued, prefetch):
    loads = [WorkerLoad(i, o, c, own) for i, (o, c, own) in enumerate(triples)]
    plan = plan_dispatch(loads, queued, prefetch)
    room = sum(policy.room(w, prefetch) for w in loads)
    # Never more than is queued, never past a worker's room, and no work left
    # waiting while some worker still has room.
    assert sum(plan.values()) == min(queued, room)
    for load in loads:
        assert plan.get(load.slot, 0) <= policy.room(load, prefetch)


@given(st.lists(st.integers(1, 16), min_size=2, max_size=8), st.integers(1, 200))
def test_plan_keeps_ratios_close_when_filling(capacities, queued):
    loads = [WorkerLoad(i, 0, c) for i, c in enumerate(capacities)]
    plan = plan_dispatch(loads, min(queued, sum(capacities)), prefetch=0)
    ratios = [plan.get(i, 0) / c for i, c in enumerate(capacities)]
    # Water-filling: no worker is more than one item (of its own capacity) ahead.
    assert max(ratios) - min(ratios) <= 1 / min(capacities) + 1e-9


@pytest.mark.parametrize(
    ("deaths", "expected"),
    [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0)],
)
def test_restart_delay_doubles_and_is_capped(deaths, expected):
    assert policy.restart_delay(deaths, base_s=0.5, cap_s=30.0) == expected


def test_describe_exit_names_the_cause():
    assert "SIGKILL" in policy.describe_exit(-signal.SIGKILL)
    assert "out of memory" in policy.describe_exit(-signal.SIGKILL)
    assert "SIGSEGV" in policy.describe_exit(-signal.SIGSEGV)
    assert "boot error" in policy.describe_exit(policy.EXIT_BOOT_ERROR)
    assert policy.describe_exit(1) == "exited with code 1"
