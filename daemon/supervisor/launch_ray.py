"""The Ray launcher: one Ray actor per slot, anywhere in a cluster (``exgen serve --ray``).

Ray places, exgen guarantees. Each start of a slot is a fresh actor holding the
slot's resources (``num_gpus``, or a custom resource; a slot of several GPUs gets
a placement group of one bundle, kept across its restarts so the reservation is
never lost between two workers). The actor starts exgen's own worker process on its
node (ray_host.py), which connects back to the router over TCP with CURVE.

Ray never retries anything: actors have ``max_restarts=0`` and
``max_task_retries=0``; a worker that ended is reported to the supervisor, which
decides about restarts as it does for local workers, and the router's ledger,
heartbeats and requeue stay the only truth about the work. A worker whose node
left the cluster has ``node_lost`` set: that death blames no prompt. A slot Ray
cannot place yet (no node with its resources) stays pending until one joins.

This module imports ray: it is imported only in Ray mode.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from exgen.daemon.config import Settings
from exgen.daemon.cpu_layout import CpuLayout
from exgen.daemon.net.workerlink import WorkerKeys
from exgen.daemon.supervisor.launch import WorkerExit
from exgen.daemon.supervisor.ray_host import WorkerHost
from exgen.daemon.supervisor.slots import Slot, WorkerProcess
from exgen.daemon.worker import WorkerSpec

logger = logging.getLogger("exgen.launch.ray")

NAMESPACE = "exgen"
POLL_S = 0.05  # how often Ray is asked about placements and exits (each is one call)
RESOLVE_S = 5.0  # a worker that said READY was placed: its actor's reply is on its way
ACTOR_THREADS = 4  # wait() blocks one; signal() and facts() must still run
CONNECT_CHECK_S = 5.0  # the cluster's GCS must accept a connection within this

RemoteHost: Any = ray.remote(WorkerHost)  # its handles' methods are Ray's, untyped


class RayModeError(RuntimeError):
    """Ray mode cannot start; the message says why (one line)."""


def connect(address: str) -> None:
    """Join the cluster as a driver (never start one: "auto" must find it running)."""
    check_reachable(address)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=True,  # the workers' log lines reach the daemon's log
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayModeError(f"cannot join the Ray cluster at {address!r}: {first}") from None


def gcs_target(address: str) -> str | None:
    """The HOST:PORT ``ray.init(address)`` will dial, where it can be told beforehand."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or _current_cluster_file() or ""
    if not address or "://" in address:
        return None  # nothing to go on (Ray says so at once), or Ray Client: its own check
    return address


def _current_cluster_file() -> str | None:
    """Where `ray start` on this machine records its cluster's address: under
    RAY_TMPDIR if set, else the temp dir (TMPDIR, /tmp), as Ray looks for it."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    path = Path(base) / "ray" / "ray_current_cluster"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def check_reachable(address: str, timeout_s: float = CONNECT_CHECK_S) -> None:
    """One line now, instead of Ray retrying an address nobody answers for minutes."""
    target = gcs_target(address)
    if target is None:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise RayModeError(
            f"no Ray cluster answers at {target} ({exc}): start one with `ray start --head`, "
            "or give its address"
        ) from None


def node_ip() -> str:
    """This machine's address as the cluster knows it: where workers connect back."""
    return str(ray.util.get_node_ip_address())


def slot_resources(settings: Settings) -> dict[str, float]:
    out: dict[str, float] = {}
    if settings.ray_gpus_per_slot:
        out[settings.ray_resource] = float(settings.ray_gpus_per_slot)
    if settings.ray_cpus_per_slot:
        out["CPU"] = float(settings.ray_cpus_per_slot)
    return out


def plan_ray_slots(settings: Settings) -> list[Slot]:
    """``workers`` slots, or one per slot's worth of the resource the cluster has now."""
    count = settings.workers
    units = settings.ray_gpus_per_slot
    if count is None:
        total = ray.cluster_resources().get(settings.ray_resource, 0.0) if units else 0.0
        count = int(total // units) if units else 1
        if count == 0:
            raise RayModeError(
                f"the Ray cluster has no {settings.ray_resource} now: give --workers N "
                "(slots then wait as pending until nodes with it join)"
            )
    resources = slot_resources(settings)
    return [Slot(i, None, resources=dict(resources)) for i in range(count)]


@dataclass(slots=True)
class RayProcess:
    """A slot's actor and the worker process it runs."""

    slot: int
    actor: Any
    facts_ref: Any
    wait_ref: Any
    public_key: str | None
    started_at: float
    node: str | None = None
    host: str | None = None
    devices: list[int] | None = None
    _pid: int | None = None
    killed_at: float | None = None  # when we sent SIGKILL: an answer is due soon

    @property
    def pid(self) -> int | None:
        return self._pid

    def is_pid(self, pid: int) -> bool:
        if self._pid is None:
            self.resolve(RESOLVE_S)
        return self._pid == pid

    def resolve(self, timeout: float) -> bool:
        """Learn pid, node and host from the actor if it has answered (within timeout)."""
        if self._pid is not None:
            return True
        ready, _ = ray.wait([self.facts_ref], timeout=timeout)
        if not ready:
            return False
        try:
            facts = ray.get(self.facts_ref)
        except RayActorError:
            return False  # it died first: ``exited`` reports it
        self._pid, self.node, self.host = int(facts["pid"]), facts["node"], facts["host"]
        self.devices = facts.get("devices")
        return True


class RayLauncher:
    """Workers as Ray actors; the supervisor's decisions stay the supervisor's."""

    def __init__(self, settings: Settings, keys: WorkerKeys | None) -> None:
        self.settings = settings
        self.keys = keys
        self.groups: dict[int, PlacementGroup] = {}  # multi-GPU slots' reservations
        self.next_poll = 0.0
        self.next_place_poll = 0.0

    # --- start ----------------------------------------------------------------------

    def start(self, slot: Slot, spec: WorkerSpec, env: dict[str, str]) -> RayProcess:
        keys = self.keys.issue() if self.keys is not None else None
        if not self.settings.ray_gpus_per_slot:  # a CPU slot: its threads, its CPUs
            env = {**CpuLayout(1, max(1, int(self.settings.ray_cpus_per_slot))).env(), **env}
        actor = RemoteHost.options(**self.actor_options(slot)).remote(spec.to_json(), env, keys)
        return RayProcess(
            slot=slot.id,
            actor=actor,
            facts_ref=actor.facts.remote(),
            wait_ref=actor.wait.remote(),
            public_key=keys[0] if keys is not None else None,
            started_at=time.monotonic(),
        )

    def actor_options(self, slot: Slot) -> dict[str, Any]:
        """The slot's resources, and no retries of any kind: exgen decides."""
        settings = self.settings
        units = settings.ray_gpus_per_slot
        options: dict[str, Any] = {
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": ACTOR_THREADS,
            "num_cpus": settings.ray_cpus_per_slot,
            "name": None,
        }
        if settings.ray_resource == "GPU":
            options["num_gpus"] = units
        elif units:
            options["resources"] = {settings.ray_resource: units}
        if units > 1:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group(slot), placement_group_bundle_index=0
            )
        return options

    def group(self, slot: Slot) -> PlacementGroup:
        """A slot of several GPUs: one bundle on one node, reserved for the slot's life."""
        if slot.id not in self.groups:
            bundle = {k: v for k, v in (slot.resources or {}).items() if v}
            self.groups[slot.id] = placement_group(
                [bundle], strategy="STRICT_PACK", name=f"exgen-slot-{slot.id}"
            )
        return self.groups[slot.id]

    def placed(self, procs: list[WorkerProcess]) -> list[WorkerProcess]:
        ours = [p for p in procs if isinstance(p, RayProcess)]
        # Resolved already: the router's check of its READY read the actor's facts.
        known: list[WorkerProcess] = [p for p in ours if p.pid is not None]
        waiting = [p for p in ours if p.pid is None]
        now = time.monotonic()
        if not waiting or now < self.next_place_poll:
            return known
        self.next_place_poll = now + POLL_S  # a slot may wait for hours: ask Ray gently
        ready, _ = ray.wait([p.facts_ref for p in waiting], num_returns=len(waiting), timeout=0)
        ready_ids = {id(ref) for ref in ready}
        return known + [p for p in waiting if id(p.facts_ref) in ready_ids and p.resolve(0)]

    # --- watch ----------------------------------------------------------------------

    def exited(self, procs: list[WorkerProcess]) -> list[tuple[WorkerProcess, WorkerExit]]:
        now = time.monotonic()
        if now < self.next_poll:
            return []
        self.next_poll = now + POLL_S
        ours = [p for p in procs if isinstance(p, RayProcess)]
        if not ours:
            return []
        ready, _ = ray.wait([p.wait_ref for p in ours], num_returns=len(ours), timeout=0)
        ready_ids = {id(ref) for ref in ready}
        out: list[tuple[WorkerProcess, WorkerExit]] = []
        for proc in ours:
            how = self._exit_of(proc) if id(proc.wait_ref) in ready_ids else self._silent(proc, now)
            if how is not None:
                self._free_actor(proc)
                out.append((proc, how))
        return out

    def _exit_of(self, proc: RayProcess) -> WorkerExit | None:
        try:
            returncode, oom_kill_seen = ray.get(proc.wait_ref)
        except ActorUnavailableError:
            proc.wait_ref = proc.actor.wait.remote()  # a passing loss of contact: ask again
            return None
        except RayActorError as exc:
            return self._actor_died(proc, exc)
        return WorkerExit(int(returncode), oom_kill_seen)

    def _actor_died(self, proc: RayProcess, exc: RayActorError) -> WorkerExit:
        text = str(exc)
        if proc.node is not None and ("node has died" in text or not node_alive(proc.node)):
            where = f"node {proc.node[:12]} ({proc.host})"
            return WorkerExit(None, node_lost=True, cause=f"{where} left the Ray cluster")
        if proc.node is None:
            return WorkerExit(None, cause=f"its Ray actor ended before placed: {_line(text)}")
        return WorkerExit(None, cause=f"its Ray actor died: {_line(text)}")

    def _silent(self, proc: RayProcess, now: float) -> WorkerExit | None:
        """A worker we SIGKILLed whose actor does not confirm: its node is unreachable."""
        if proc.killed_at is None or now - proc.killed_at < self.settings.ray_kill_timeout_s:
            return None
        silent = now - proc.killed_at  # its actor is freed (killed) next
        where = f"node {(proc.node or '?')[:12]} ({proc.host})"
        return WorkerExit(
            None, node_lost=True, cause=f"{where} did not answer for {silent:.0f}s: unreachable"
        )

    def _free_actor(self, proc: RayProcess) -> None:
        """The worker ended: its actor goes (freeing the resources), its key is revoked."""
        if self.keys is not None and proc.public_key is not None:
            self.keys.revoke(proc.public_key)
        try:
            ray.kill(proc.actor, no_restart=True)
        except (RayActorError, ValueError):
            pass  # gone already

    # --- stop -----------------------------------------------------------------------

    def signal(self, proc: WorkerProcess, sig: int) -> None:
        assert isinstance(proc, RayProcess)
        if proc.pid is None:
            ray.kill(proc.actor, no_restart=True)  # never placed: nothing runs yet
            return
        proc.actor.signal.remote(int(sig))
        if sig == signal.SIGKILL and proc.killed_at is None:
            proc.killed_at = time.monotonic()

    def wait(self, procs: list[WorkerProcess], timeout_s: float) -> None:
        ours = [p for p in procs if isinstance(p, RayProcess)]
        if ours:
            refs = [p.wait_ref for p in ours]
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for proc in ours:
            self._free_actor(proc)  # what did not stop in time goes with its actor

    def close(self) -> None:
        for group in self.groups.values():
            remove_placement_group(group)
        self.groups.clear()
        ray.shutdown()


def node_alive(node_id: str) -> bool:
    """Whether the cluster still counts this node in (one question to Ray's GCS)."""
    return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())


def _line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"
