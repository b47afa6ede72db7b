"""Launchers: how one worker process is started, watched and stopped — nothing else.

The supervisor decides (which slots, when to restart, back-off, boot errors,
flapping, commanded stops, what a death blames); a launcher only carries it out for
one worker at a time and reports what it saw. Two of them:

- ``LocalLauncher`` (here): a subprocess of the supervisor on this machine.
- ``RayLauncher`` (launch_ray.py): a Ray actor per slot, anywhere in a cluster,
  which starts the same worker process on its node (imported only in Ray mode).

Whatever the launcher, the worker is the same ``python -m exgen.daemon.worker SPEC
PARENT`` and the router's ledger, heartbeats and requeue stay the only source of
truth about the work.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from exgen.daemon.cpu_layout import cpu_layout, usable_cores, worker_env
from exgen.daemon.procs import kill_after
from exgen.daemon.supervisor.slots import Slot, WorkerProcess

if TYPE_CHECKING:
    from exgen.daemon.worker import WorkerSpec

logger = logging.getLogger("exgen.launch")

VMSTAT = Path("/proc/vmstat")


@dataclass(slots=True)
class WorkerExit:
    """How one worker ended, as far as its launcher could see."""

    returncode: int | None  # None: unknown (its node or its actor vanished)
    oom_kill_seen: bool | None = None  # the kernel of its machine OOM-killed something
    node_lost: bool = False  # its machine left the cluster: the work is not to blame
    cause: str | None = None  # the launcher's own words, when the exit code says nothing


class Launcher(Protocol):
    def start(self, slot: Slot, spec: WorkerSpec, env: dict[str, str]) -> WorkerProcess:
        """Start the slot's worker; ``env``: exgen's variables for it (not the whole
        environment: the launcher adds the machine's own)."""
        ...

    def placed(self, procs: list[WorkerProcess]) -> list[WorkerProcess]:
        """Those of ``procs`` (their place not yet noted) that have one now, whether
        this poll or an earlier question (a READY's ``is_pid``) learnt it."""
        ...

    def exited(self, procs: list[WorkerProcess]) -> list[tuple[WorkerProcess, WorkerExit]]:
        """Those of ``procs`` that have ended, with how."""
        ...

    def signal(self, proc: WorkerProcess, sig: int) -> None: ...

    def wait(self, procs: list[WorkerProcess], timeout_s: float) -> None:
        """Wait for ``procs`` to end; SIGKILL what is left after the timeout."""
        ...

    def close(self) -> None: ...


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


def oom_kill_between(before: int | None, after: int | None) -> bool | None:
    """Did the kernel OOM-kill anything between two readings? None: cannot tell."""
    if before is None or after is None:
        return None
    return after > before


def worker_command(spec: WorkerSpec, parent_pid: int) -> list[str]:
    """The worker's command line (the spec holds no secret: keys travel on stdin)."""
    return [sys.executable, "-m", "exgen.daemon.worker", spec.to_json(), str(parent_pid)]


@dataclass(slots=True)
class LocalProcess:
    slot: int
    popen: subprocess.Popen[bytes]
    devices: list[int] | None
    node: str | None = "local"
    host: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_pid(self, pid: int) -> bool:
        return self.popen.pid == pid


class LocalLauncher:
    """Workers as subprocesses of the supervisor, on this machine."""

    def __init__(self, cpu_slots: int = 1) -> None:
        self.cpu_layout = cpu_layout(cpu_slots, usable_cores())
        self.host = socket.gethostname()
        self.oom_kills = read_oom_kills()

    def start(self, slot: Slot, spec: WorkerSpec, env: dict[str, str]) -> LocalProcess:
        full = {**os.environ, **env}
        # Narrow the GPUs before the worker imports anything: a library that opens a
        # CUDA context on "device 0" must see this slot's card as device 0.
        full["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot.devices)) if slot.devices else ""
        # CPU slots share the cores: N workers each using every core thrash.
        full.update(worker_env(self.cpu_layout, os.environ, is_cpu_slot=not slot.devices))
        # A new session: Ctrl-C in a terminal reaches the supervisor only, which drains.
        popen = subprocess.Popen(
            worker_command(spec, os.getpid()), env=full, start_new_session=True
        )
        return LocalProcess(slot.id, popen, slot.devices, host=self.host)

    def placed(self, procs: list[WorkerProcess]) -> list[WorkerProcess]:
        return []  # never asked: a subprocess has its place (and pid) from the start

    def exited(self, procs: list[WorkerProcess]) -> list[tuple[WorkerProcess, WorkerExit]]:
        ended = [p for p in procs if isinstance(p, LocalProcess) and p.popen.poll() is not None]
        if not ended:
            return []
        before, self.oom_kills = self.oom_kills, read_oom_kills()
        oom = oom_kill_between(before, self.oom_kills)
        return [(p, WorkerExit(p.popen.returncode, oom)) for p in ended]

    def signal(self, proc: WorkerProcess, sig: int) -> None:
        assert isinstance(proc, LocalProcess)
        try:
            proc.popen.send_signal(sig)
        except ProcessLookupError:
            pass

    def wait(self, procs: list[WorkerProcess], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            assert isinstance(proc, LocalProcess)
            kill_after(proc.popen, deadline, logger, f"slot {proc.slot} pid {proc.pid}")

    def close(self) -> None:
        pass


__all__ = [
    "Launcher",
    "LocalLauncher",
    "LocalProcess",
    "WorkerExit",
    "WorkerProcess",
    "oom_kill_between",
    "read_oom_kills",
]
