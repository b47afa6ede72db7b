"""Worker slots and their process lifecycle — nothing else.

A slot is a stable id (its GPU or GPU group) whose process comes and goes. Each
tick the daemon asks the supervisor to reap exits, and to start whatever is due;
restarts back off exponentially on deaths within the flapping window, commanded
stops are not counted as deaths, and a boot error (exit code 3) is never retried.
A worker that finished work before it died was not crash-looping: its death starts
the back-off over.

How a worker is started, watched and stopped is its launcher's (launch.py: a local
subprocess, or a Ray actor anywhere in a cluster); what to do about it is decided
here, the same whatever the launcher. A slot whose launcher has no place for it yet
(no node with its resources) is ``pending`` and becomes ``starting`` once placed.
Whoever learns the place first (the placement poll, or the router checking the
worker's READY), the supervisor notes it once: ``Slot.placed`` is its own flag.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from exgen.daemon import policy
from exgen.daemon.config import Settings
from exgen.daemon.supervisor.backoff import Backoff
from exgen.daemon.supervisor.launch import Launcher, LocalLauncher, WorkerExit
from exgen.daemon.supervisor.slots import (
    FAILED,
    PENDING,
    READY,
    RESTARTING,
    STARTING,
    STOPPED,
    Slot,
    SlotTable,
    WorkerProcess,
)
from exgen.daemon.worker import WorkerSpec

__all__ = [
    "FAILED",
    "PENDING",
    "READY",
    "RESTARTING",
    "STARTING",
    "STOPPED",
    "Exit",
    "Slot",
    "Supervisor",
]

logger = logging.getLogger("exgen.supervisor")

# How long a boot-error exit waits for its FATAL message before the daemon gives up
# with a generic reason (the message is sent first, but may be read after the exit).
FATAL_GRACE_S = 2.0
BOOT_ERROR_UNREAD = "the engine cannot load (see the log above)"


@dataclass(slots=True)
class Exit:
    slot: int
    pid: int
    cause: str
    crashed: bool  # neither commanded nor a boot error
    blames_work: bool = True  # counts against the items on board (policy.death_blames_work)


def plan_slots(settings: Settings, gpu_slots: list[list[int]] | None) -> list[Slot]:
    """One slot per GPU group, or ``workers`` CPU slots."""
    if gpu_slots:
        return [Slot(i, devices) for i, devices in enumerate(gpu_slots)]
    return [Slot(i, None) for i in range(settings.workers or 1)]


def where(slot: Slot) -> str:
    """A slot's place for log lines: its devices, and its node and host beyond this one."""
    devices = ",".join(map(str, slot.devices)) if slot.devices else "cpu"
    if slot.resources:
        devices = ",".join(f"{k}={v:g}" for k, v in slot.resources.items())
    if slot.node in (None, "local"):
        return f"devices {devices}"
    return f"node {(slot.node or '')[:12]} host {slot.host} {devices}"


def on_node(slot: Slot) -> str:
    """`` node N host H`` for a worker on another machine; nothing for a local one."""
    if slot.node in (None, "local"):
        return ""
    return f" node {(slot.node or '')[:12]} host {slot.host}"


class Supervisor:
    """Process lifecycle of the slots in ``table`` (whose records it shares with the
    router): spawn, reap, restart with back-off, kill, stop — through ``launcher``."""

    def __init__(
        self,
        settings: Settings,
        table: SlotTable,
        backend: str,
        engine: str,
        model: str | None,
        launcher: Launcher | None = None,
        curve_server_key: str | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.slots = table.by_id
        self.backend = backend
        self.engine = engine
        self.model = model
        cpu_slots = sum(1 for s in table if not s.devices and not s.resources)
        self.launcher: Launcher = launcher or LocalLauncher(cpu_slots)
        # The backend's CURVE public key (Ray mode): workers then read their own keys
        # from stdin, handed over by their launcher.
        self.curve_server_key = curve_server_key
        self.backoff = Backoff(
            settings.restart_backoff_s, settings.restart_backoff_max_s, settings.flap_window_s
        )

    def start_all(self) -> None:
        for slot in self.slots.values():
            self.spawn_worker(slot)

    def worker_spec(self, slot: Slot) -> WorkerSpec:
        return WorkerSpec(
            slot=slot.id,
            backend=self.backend,
            engine=self.engine,
            model=self.model,
            engine_opts=self.settings.engine_opts,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            devices=slot.devices,
            log_level=self.settings.log_level,
            curve_server_key=self.curve_server_key,
        )

    @staticmethod
    def worker_env(slot: Slot) -> dict[str, str]:
        """exgen's variables for a worker (its launcher adds the machine's own)."""
        env = {
            "PYTHONUNBUFFERED": "1",
            "EXGEN_SLOT": str(slot.id),  # for engines and tools that act per slot
        }
        if "TQDM_DISABLE" not in os.environ:
            # A worker's stderr is the daemon's log: no progress bars from libraries.
            env["TQDM_DISABLE"] = "1"
        return env

    def spawn_worker(self, slot: Slot) -> None:
        slot.proc = self.launcher.start(slot, self.worker_spec(slot), self.worker_env(slot))
        slot.kill_cause = None
        slot.kill_blames_work = True
        slot.stopping = False
        slot.loading_beat = 0.0
        slot.placed = False
        slot.state = PENDING
        slot.node = slot.host = None
        if slot.proc.pid is None:
            logger.info("pending slot %d: waiting for a place in the cluster", slot.id)
        else:
            self._placed(slot, time.monotonic())

    def _placed(self, slot: Slot, now: float) -> None:
        assert slot.proc is not None
        slot.placed = True
        if slot.state == PENDING:  # not when its READY was read first: it is ready
            slot.state = STARTING
        slot.spawned_at = now  # the loading grace counts from here, not from pending
        slot.node, slot.host = slot.proc.node, slot.proc.host
        if slot.resources is not None:  # placed by Ray: the GPUs it got on its node
            slot.devices = slot.proc.devices
        logger.info("spawn slot %d pid %d %s", slot.id, slot.proc.pid, where(slot))

    def reap_workers(self, now: float) -> list[Exit]:
        """Note the workers that got a place, and reap those that ended."""
        unplaced = [s.proc for s in self.slots.values() if s.proc is not None and not s.placed]
        if unplaced:
            for proc in self.launcher.placed(unplaced):
                self._placed(self.slots[proc.slot], now)
        procs = [s.proc for s in self.slots.values() if s.proc is not None]
        if not procs:
            return []
        return [
            self._on_exit(self.slots[proc.slot], proc, how, now)
            for proc, how in self.launcher.exited(procs)
        ]

    def _on_exit(self, slot: Slot, proc: WorkerProcess, how: WorkerExit, now: float) -> Exit:
        pid = proc.pid or 0
        slot.proc = None
        slot.last_pid = pid or slot.last_pid
        cause, blames_work = self._judge_death(slot, how)
        slot.last_exit = cause
        if slot.stopping:
            slot.state = STOPPED
            logger.info("exit slot %d pid %d%s: stopped (%s)", slot.id, pid, on_node(slot), cause)
            return Exit(slot.id, pid, cause, crashed=False)
        if how.returncode == policy.EXIT_BOOT_ERROR:
            slot.state = FAILED
            slot.boot_failed_at = now
            reason = slot.boot_error or BOOT_ERROR_UNREAD
            logger.error(
                "exit slot %d pid %d: boot error: %s — not restarting", slot.id, pid, reason
            )
            return Exit(slot.id, pid, f"boot error: {reason}", crashed=False)
        self._schedule_restart(slot, now, productive=self._did_work(slot, pid))
        logger.warning(
            "exit slot %d pid %d%s: %s — restart %d in %.1fs",
            slot.id,
            pid,
            on_node(slot),
            cause,
            slot.restarts + 1,
            slot.next_start_at - now,
        )
        return Exit(slot.id, pid, cause, crashed=True, blames_work=blames_work)

    @staticmethod
    def _judge_death(slot: Slot, how: WorkerExit) -> tuple[str, bool]:
        """The death's cause in words, and whether it counts against the work."""
        killed_by_us = slot.kill_cause is not None
        if how.node_lost:
            # Its machine went away: nothing about the prompts on board says why.
            cause = how.cause or "its node was lost"
            return (f"{slot.kill_cause}; {cause}" if killed_by_us else cause), False
        if how.returncode is None:
            cause = slot.kill_cause or how.cause or "ended, exit status unknown"
            return cause, slot.kill_blames_work
        cause = (
            slot.kill_cause or how.cause or policy.describe_exit(how.returncode, how.oom_kill_seen)
        )
        blames_work = slot.kill_blames_work and policy.death_blames_work(
            how.returncode, killed_by_us, how.oom_kill_seen
        )
        return cause, blames_work

    def _schedule_restart(self, slot: Slot, now: float, productive: bool) -> None:
        delay = self.backoff.note_death(slot.deaths, now, productive)
        slot.next_start_at = now + delay
        # Flapping: too many deaths in the window. Keep trying at the capped delay,
        # but show the slot as failed so an operator sees it.
        flapping = len(slot.deaths) >= self.settings.flap_max_deaths
        slot.state = FAILED if flapping else RESTARTING
        if flapping:
            logger.error(
                "slot %d is flapping: %d deaths in %.0fs; next try in %.0fs",
                slot.id,
                len(slot.deaths),
                self.settings.flap_window_s,
                delay,
            )

    def restart_due(self, now: float) -> None:
        for slot in self.slots.values():
            due = slot.state in (RESTARTING, FAILED) and not self._boot_failed(slot)
            if due and slot.proc is None and now >= slot.next_start_at:
                slot.restarts += 1
                logger.info(
                    "restart slot %d (was pid %s, restart %d)",
                    slot.id,
                    slot.last_pid,
                    slot.restarts,
                )
                self.spawn_worker(slot)

    @staticmethod
    def _did_work(slot: Slot, pid: int) -> bool:
        """Whether the worker ``pid`` finished any item (it was not crash-looping)."""
        serving = slot.serving
        return serving is not None and serving.pid == pid and serving.completed + serving.failed > 0

    def kill_worker(self, slot_id: int, pid: int, cause: str, blames_work: bool = True) -> None:
        """SIGKILL a hung or frozen worker; its exit is reported with ``cause``."""
        slot = self.slots.get(slot_id)
        if slot is None or slot.proc is None or not slot.proc.is_pid(pid):
            return
        slot.kill_cause = cause
        slot.kill_blames_work = blames_work
        logger.warning("kill slot %d pid %d%s: %s", slot_id, pid, on_node(slot), cause)
        self.launcher.signal(slot.proc, signal.SIGKILL)

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        """A commanded stop of every worker; exits are not counted as crashes."""
        for slot in self.slots.values():
            slot.stopping = True
            if slot.proc is not None:
                self.launcher.signal(slot.proc, sig)

    def wait_all(self, timeout_s: float) -> None:
        """Wait for every worker to exit; SIGKILL what is left after the timeout."""
        procs = [s.proc for s in self.slots.values() if s.proc is not None]
        self.launcher.wait(procs, timeout_s)
        for slot in self.slots.values():
            if slot.proc is not None:
                slot.proc = None
                slot.state = STOPPED

    @staticmethod
    def _boot_failed(slot: Slot) -> bool:
        return slot.boot_error is not None or slot.boot_failed_at is not None

    def all_boot_failed(self, now: float) -> bool:
        """Whether no slot can start, each one's reason known (or waited for)."""
        return all(
            s.proc is None and (s.boot_error is not None or self._fatal_overdue(s, now))
            for s in self.slots.values()
        )

    @staticmethod
    def _fatal_overdue(slot: Slot, now: float) -> bool:
        # A worker sends its FATAL message before it exits, but the router may reap
        # the exit first: the message gets a moment to be read before a generic one.
        failed_at = slot.boot_failed_at
        return failed_at is not None and now - failed_at >= FATAL_GRACE_S

    def boot_errors(self) -> list[str]:
        return sorted(
            {s.boot_error or BOOT_ERROR_UNREAD for s in self.slots.values() if self._boot_failed(s)}
        )

    def count(self, state: str) -> int:
        return self.table.count(state)
