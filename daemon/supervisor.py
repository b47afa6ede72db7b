"""Worker slots and their process lifecycle — nothing else.

A slot is a stable id (its GPU or GPU group) whose process comes and goes. Each
tick the daemon asks the supervisor to reap exits, and to start whatever is due;
restarts back off exponentially on deaths within the flapping window, commanded
stops are not counted as deaths, and a boot error (exit code 3) is never retried.
A worker that finished work before it died was not crash-looping: its death starts
the back-off over.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from exgen.daemon import policy
from exgen.daemon.config import Settings
from exgen.daemon.engines.cpu_layout import CpuLayout, cpu_layout, usable_cores, worker_env
from exgen.daemon.slots import FAILED, READY, RESTARTING, STARTING, STOPPED, Slot, SlotTable
from exgen.daemon.worker import WorkerSpec

__all__ = ["FAILED", "READY", "RESTARTING", "STARTING", "STOPPED", "Exit", "Slot", "Supervisor"]

logger = logging.getLogger("exgen.supervisor")

VMSTAT = Path("/proc/vmstat")


@dataclass(slots=True)
class Exit:
    slot: int
    pid: int
    cause: str
    crashed: bool  # neither commanded nor a boot error
    blames_work: bool = True  # counts against the items on board (policy.death_blames_work)


def read_oom_kills(vmstat: Path = VMSTAT) -> int | None:
    """The kernel's count of OOM kills (global and cgroup); None where unreadable."""
    try:
        for line in vmstat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def plan_slots(settings: Settings, gpu_slots: list[list[int]] | None) -> list[Slot]:
    """One slot per GPU group, or ``workers`` CPU slots."""
    if gpu_slots:
        return [Slot(i, devices) for i, devices in enumerate(gpu_slots)]
    return [Slot(i, None) for i in range(settings.workers or 1)]


class Supervisor:
    """Process lifecycle of the slots in ``table`` (whose records it shares with the
    router): spawn, reap, restart with back-off, kill, stop."""

    def __init__(
        self, settings: Settings, table: SlotTable, backend: str, engine: str, model: str | None
    ) -> None:
        self.settings = settings
        self.table = table
        self.slots = table.by_id
        self.backend = backend
        self.engine = engine
        self.model = model
        self.oom_kills = read_oom_kills()

    def start_all(self) -> None:
        for slot in self.slots.values():
            self.spawn_worker(slot)

    def spawn_worker(self, slot: Slot) -> None:
        spec = WorkerSpec(
            slot=slot.id,
            backend=self.backend,
            engine=self.engine,
            model=self.model,
            engine_opts=self.settings.engine_opts,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            devices=slot.devices,
            log_level=self.settings.log_level,
        )
        env = dict(os.environ)
        # Narrow the GPUs before the worker imports anything: a library that opens a
        # CUDA context on "device 0" must see this slot's card as device 0.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot.devices)) if slot.devices else ""
        env["PYTHONUNBUFFERED"] = "1"
        env["EXGEN_SLOT"] = str(slot.id)  # for engines and tools that act per slot
        # A worker's stderr is the daemon's log: no progress bars from libraries there.
        env.setdefault("TQDM_DISABLE", "1")
        # CPU slots share the cores: N workers each using every core thrash.
        env.update(worker_env(self.cpu_layout(), os.environ, is_cpu_slot=not slot.devices))
        # A new session: Ctrl-C in a terminal reaches the supervisor only, which drains.
        slot.proc = subprocess.Popen(
            [sys.executable, "-m", "exgen.daemon.worker", spec.to_json(), str(os.getpid())],
            env=env,
            start_new_session=True,
        )
        slot.state = STARTING
        slot.spawned_at = time.monotonic()
        slot.kill_cause = None
        slot.kill_blames_work = True
        slot.stopping = False
        slot.loading_beat = 0.0
        devices = ",".join(map(str, slot.devices)) if slot.devices else "cpu"
        logger.info("spawn slot %d pid %d devices %s", slot.id, slot.proc.pid, devices)

    def cpu_layout(self) -> CpuLayout:
        cpu_slots = sum(1 for s in self.slots.values() if not s.devices)
        return cpu_layout(cpu_slots, usable_cores())

    def reap_workers(self, now: float) -> list[Exit]:
        exited = [
            s for s in self.slots.values() if s.proc is not None and s.proc.poll() is not None
        ]
        if not exited:
            return []
        oom_kill_seen = self._oom_kill_seen()
        exits = []
        for slot in exited:
            assert slot.proc is not None
            pid, returncode = slot.proc.pid, slot.proc.returncode
            exits.append(self._on_exit(slot, pid, returncode, oom_kill_seen, now))
        return exits

    def _oom_kill_seen(self) -> bool | None:
        """Did the kernel OOM-kill anything since we last looked? None: cannot tell."""
        before, self.oom_kills = self.oom_kills, read_oom_kills()
        if before is None or self.oom_kills is None:
            return None
        return self.oom_kills > before

    def _on_exit(
        self, slot: Slot, pid: int, returncode: int, oom_kill_seen: bool | None, now: float
    ) -> Exit:
        slot.proc = None
        slot.last_pid = pid
        cause = slot.kill_cause or policy.describe_exit(returncode, oom_kill_seen)
        killed_by_us = slot.kill_cause is not None
        blames_work = slot.kill_blames_work and policy.death_blames_work(
            returncode, killed_by_us, oom_kill_seen
        )
        slot.last_exit = cause
        if slot.stopping:
            slot.state = STOPPED
            logger.info("exit slot %d pid %d: stopped (%s)", slot.id, pid, cause)
            return Exit(slot.id, pid, cause, crashed=False)
        if returncode == policy.EXIT_BOOT_ERROR:
            slot.state = FAILED
            reason = slot.boot_error or "the engine cannot load (see the log above)"
            logger.error(
                "exit slot %d pid %d: boot error: %s — not restarting", slot.id, pid, reason
            )
            return Exit(slot.id, pid, f"boot error: {reason}", crashed=False)
        self._schedule_restart(slot, now, productive=self._did_work(slot, pid))
        logger.warning(
            "exit slot %d pid %d: %s — restart %d in %.1fs",
            slot.id,
            pid,
            cause,
            slot.restarts + 1,
            slot.next_start_at - now,
        )
        return Exit(slot.id, pid, cause, crashed=True, blames_work=blames_work)

    def _schedule_restart(self, slot: Slot, now: float, productive: bool) -> None:
        if productive:
            slot.deaths.clear()
        slot.deaths.append(now)
        while slot.deaths and now - slot.deaths[0] > self.settings.flap_window_s:
            slot.deaths.popleft()
        delay = policy.restart_delay(
            len(slot.deaths), self.settings.restart_backoff_s, self.settings.restart_backoff_max_s
        )
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
            due = slot.state in (RESTARTING, FAILED) and slot.boot_error is None
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
        if slot is None or slot.proc is None or slot.proc.pid != pid:
            return
        slot.kill_cause = cause
        slot.kill_blames_work = blames_work
        logger.warning("kill slot %d pid %d: %s", slot_id, pid, cause)
        self._signal(slot, signal.SIGKILL)

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        """A commanded stop of every worker; exits are not counted as crashes."""
        for slot in self.slots.values():
            slot.stopping = True
            if slot.proc is not None:
                self._signal(slot, sig)

    def _signal(self, slot: Slot, sig: int) -> None:
        assert slot.proc is not None
        try:
            slot.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def wait_all(self, timeout_s: float) -> None:
        """Wait for every worker to exit; SIGKILL what is left after the timeout."""
        deadline = time.monotonic() + timeout_s
        for slot in self.slots.values():
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "slot %d pid %d did not stop in time: SIGKILL", slot.id, slot.proc.pid
                )
                slot.proc.kill()
                slot.proc.wait()
            slot.proc = None
            slot.state = STOPPED

    @property
    def all_boot_failed(self) -> bool:
        return all(s.boot_error is not None and s.proc is None for s in self.slots.values())

    def boot_errors(self) -> list[str]:
        return sorted({s.boot_error for s in self.slots.values() if s.boot_error})

    def count(self, state: str) -> int:
        return self.table.count(state)
