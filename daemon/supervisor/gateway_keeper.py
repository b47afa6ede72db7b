"""Keeps the HTTP gateway process alive: spawn, reap, restart with back-off, stop.

Self-contained on purpose: the daemon calls ``start()`` once, ``poll()`` on each
housekeeping turn (and on SIGCHLD), ``reload()`` on SIGHUP and ``stop()`` at the end.
The gateway is a fresh interpreter in its own session (Ctrl-C reaches only the
supervisor, which then stops it) that dies with the supervisor (PR_SET_PDEATHSIG).
A gateway that cannot start at all (exit code 3: a port in use, an unusable state
directory) is not restarted; any other death is, with the workers' back-off
(backoff.py): a delay that doubles with each death in the flapping window, started
over by a death after it ran for a while.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque

from exgen.daemon import policy
from exgen.daemon.config import Settings
from exgen.daemon.gateway.options import GatewayOptions
from exgen.daemon.procs import kill_after
from exgen.daemon.supervisor.backoff import Backoff

logger = logging.getLogger("exgen.gateway.keeper")

STOP_TIMEOUT_S = 10.0


class GatewayKeeper:
    def __init__(
        self,
        argv: list[str] | None,
        backoff_s: float,
        backoff_max_s: float,
        flap_window_s: float = 60.0,
    ) -> None:
        self.argv = argv  # None: no gateway configured; every call is a no-op
        self.backoff = Backoff(backoff_s, backoff_max_s, flap_window_s)
        self.stable_after_s = max(10.0, backoff_max_s)  # ran this long: not crash-looping
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.deaths: deque[float] = deque()
        self.next_start_at: float | None = None
        self.gave_up = False

    @classmethod
    def from_settings(cls, settings: Settings, router: str) -> GatewayKeeper:
        argv = None
        if settings.http is not None:
            options = GatewayOptions.from_settings(settings, router)
            argv = [sys.executable, "-m", "exgen.daemon.gateway", *options.to_argv()]
        return cls(
            argv,
            settings.restart_backoff_s,
            settings.restart_backoff_max_s,
            settings.flap_window_s,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.argv is None:
            return
        argv = [*self.argv, "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(argv, start_new_session=True)
        self.started_at = time.monotonic()
        self.next_start_at = None
        logger.info("spawn gateway pid %d", self.proc.pid)

    def poll(self, now: float) -> None:
        """Reap a dead gateway and schedule its restart; start one that is due."""
        if self.proc is not None and self.proc.poll() is not None:
            self._on_exit(self.proc.pid, self.proc.returncode, now)
        if self.next_start_at is not None and now >= self.next_start_at:
            self.start()

    def _on_exit(self, pid: int, returncode: int, now: float) -> None:
        self.proc = None
        cause = policy.describe_exit(returncode, None)
        if returncode == policy.EXIT_BOOT_ERROR:
            logger.error("exit gateway pid %d: cannot start (see above) — not restarting", pid)
            self.gave_up = True
            return
        productive = now - self.started_at > self.stable_after_s
        delay = self.backoff.note_death(self.deaths, now, productive)
        self.next_start_at = now + delay
        logger.warning("exit gateway pid %d: %s — restart in %.1fs", pid, cause, delay)

    def reload(self) -> None:
        """SIGHUP to the gateway: it re-reads its API keys."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (the gateway commits its batches' progress), SIGKILL after the timeout."""
        self.next_start_at = None
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        kill_after(self.proc, time.monotonic() + timeout_s, logger, f"gateway pid {self.proc.pid}")
        self.proc = None
