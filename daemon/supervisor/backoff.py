"""Restart back-off, one rule for every process the supervisor keeps (worker slots and
the HTTP gateway).

A death is remembered for the flapping window; the delay before the next start
doubles with each death remembered (``policy.restart_delay``: base, 2×base, … up to
the cap). A process that was productive before it died was not crash-looping: its
death starts the count over. What "productive" means is the caller's: a worker that
finished an item, a gateway that ran for a while.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from exgen.daemon.policy import restart_delay


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float
    cap_s: float
    window_s: float

    def note_death(self, deaths: deque[float], now: float, productive: bool) -> float:
        """Remember a death at ``now`` in ``deaths`` (oldest first); the delay before
        the next start."""
        if productive:
            deaths.clear()
        deaths.append(now)
        while deaths and now - deaths[0] > self.window_s:
            deaths.popleft()
        return restart_delay(len(deaths), self.base_s, self.cap_s)
