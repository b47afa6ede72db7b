"""Liveness is fair to workers: silence counts only up to what the router had read,
and a kill decided while the router itself stalled blames no prompt."""

from __future__ import annotations

from dataclasses import dataclass

from exgen.daemon.config import Settings
from exgen.daemon.supervisor import liveness
from exgen.daemon.supervisor.slots import READY, STARTING, Serving, Slot, SlotTable

SETTINGS = Settings(heartbeat_timeout_s=10.0, progress_timeout_s=300.0)


@dataclass
class Proc:
    pid: int


def table(last_heartbeat: float, progress_at: float = 0.0) -> SlotTable:
    slot = Slot(0, None, proc=Proc(100), state=READY)  # type: ignore[arg-type]
    serving = Serving(100, b"w0", 4, "synthetic", 0.0, None, {}, 0.0, last_heartbeat)
    serving.progress_at = progress_at
    slot.serving = serving
    return SlotTable([slot])


def test_a_worker_silent_past_the_timeout_is_killed_and_blamed():
    [kill] = liveness.find_unresponsive(table(0.0), {}, 20.0, 20.0, False, SETTINGS)
    assert (kill.slot, kill.pid, kill.blames_work) == (0, 100, True)
    assert "missed heartbeats for 20s" in kill.cause


def test_silence_the_router_did_not_hear_is_not_silence():
    # The router was stuck until t=20 and has read every waiting message only up to
    # t=9: the worker's last beat at 0 is 9 s old as far as anyone knows.
    assert liveness.find_unresponsive(table(0.0), {}, 20.0, 9.0, False, SETTINGS) == []


def test_a_kill_decided_while_the_router_lagged_blames_no_prompt():
    [kill] = liveness.find_unresponsive(table(0.0), {}, 20.0, 20.0, True, SETTINGS)
    assert kill.blames_work is False


def test_no_progress_with_work_on_board_is_a_hang():
    slots = table(last_heartbeat=399.0, progress_at=0.0)
    assert liveness.find_unresponsive(slots, {}, 400.0, 400.0, False, SETTINGS) == []
    [kill] = liveness.find_unresponsive(slots, {0: 3}, 400.0, 400.0, False, SETTINGS)
    assert "no progress for 400s" in kill.cause


def test_a_loading_worker_gets_its_grace_then_must_beat():
    slot = Slot(0, None, proc=Proc(7), state=STARTING, spawned_at=0.0)  # type: ignore[arg-type]
    slots = SlotTable([slot])
    assert liveness.find_unresponsive(slots, {}, 35.0, 35.0, False, SETTINGS) == []
    [kill] = liveness.find_unresponsive(slots, {}, 41.0, 41.0, False, SETTINGS)
    assert "while loading" in kill.cause
    slot.loading_beat = 40.0
    assert liveness.find_unresponsive(slots, {}, 45.0, 45.0, False, SETTINGS) == []
