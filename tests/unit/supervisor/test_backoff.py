"""The one restart back-off, shared by the worker slots and the gateway keeper."""

from __future__ import annotations

from collections import deque

from exgen.daemon.supervisor.backoff import Backoff


def test_delay_doubles_with_each_death_in_the_window_up_to_the_cap():
    backoff = Backoff(base_s=0.5, cap_s=3.0, window_s=60.0)
    deaths: deque[float] = deque()
    delays = [backoff.note_death(deaths, now, productive=False) for now in (0, 1, 2, 3, 4)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_deaths_age_out_of_the_window():
    backoff = Backoff(base_s=1.0, cap_s=30.0, window_s=10.0)
    deaths: deque[float] = deque()
    backoff.note_death(deaths, 0.0, productive=False)
    backoff.note_death(deaths, 5.0, productive=False)
    assert backoff.note_death(deaths, 12.0, productive=False) == 2.0  # the death at 0 is gone
    assert list(deaths) == [5.0, 12.0]


def test_a_productive_death_starts_the_count_over():
    backoff = Backoff(base_s=1.0, cap_s=30.0, window_s=60.0)
    deaths: deque[float] = deque([1.0, 2.0, 3.0])
    assert backoff.note_death(deaths, 4.0, productive=True) == 1.0
    assert list(deaths) == [4.0]
