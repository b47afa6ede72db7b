"""Which workers to kill: frozen (no heartbeats) or hung (no progress with work on board).

Fair to the worker: silence is counted only up to ``heard_until``, the last moment
the router had read every message waiting from its workers. A router busy elsewhere
(a costly client frame, a burst of results) has not *heard* silence, it has not
listened, and a worker is never killed for the router's own lag. A kill decided
while the router lagged noticeably is flagged so the death blames no prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from exgen.daemon.config import Settings
from exgen.daemon.supervisor.slots import STARTING, SlotTable

# Loading a model gives no heartbeats until the worker's thread starts: a fresh
# process gets this long (or the heartbeat timeout, if longer) before it counts.
LOADING_GRACE_S = 30.0


@dataclass(slots=True)
class Kill:
    slot: int
    pid: int
    cause: str
    blames_work: bool = True


def find_unresponsive(
    table: SlotTable,
    held: dict[int, int],
    now: float,
    heard_until: float,
    lagged: bool,
    settings: Settings,
) -> list[Kill]:
    """Kills due now. ``held``: items on board per slot; ``lagged``: the router's loop
    stalled recently (kills then blame no work)."""
    kills = []
    hb_timeout = settings.heartbeat_timeout_s
    for slot in table:
        serving = slot.serving
        if serving is None or slot.pid != serving.pid:
            continue
        silent = heard_until - serving.last_heartbeat
        stuck = heard_until - serving.progress_at
        if silent > hb_timeout:
            cause = f"missed heartbeats for {silent:.0f}s (frozen?)"
        elif held.get(slot.id) and stuck > settings.progress_timeout_s:
            cause = f"no progress for {stuck:.0f}s (engine hung?)"
        else:
            continue
        kills.append(Kill(slot.id, serving.pid, cause, blames_work=not lagged))
    for slot in table:
        if slot.state != STARTING or slot.pid is None or slot.serving is not None:
            continue
        last = max(slot.loading_beat, slot.spawned_at + max(LOADING_GRACE_S, hb_timeout))
        if heard_until - last > hb_timeout:
            cause = f"missed heartbeats while loading for {heard_until - last:.0f}s"
            kills.append(Kill(slot.id, slot.pid, cause, blames_work=not lagged))
    return kills
