"""Worker slots: one record per slot, owned by one table (gunicorn's ``WORKERS``).

A slot is a stable id (its GPU or GPU group) whose process comes and goes. Its
record holds everything about it: the process (pid, state, restarts, deaths — the
supervisor's side), the serving worker of the moment (identity, capacity, heartbeat,
progress — the router's side, reset at every spawn) and its history across restarts.
Which items a slot's worker holds is the ledger's to say, not this record's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from exgen.daemon import policy

PENDING = "pending"  # started, waiting for the cluster to have a place for it (Ray)
STARTING = "starting"
READY = "ready"
RESTARTING = "restarting"
FAILED = "failed"
STOPPED = "stopped"

# Serving.burst, the most results a worker sent at once lately, halves every this
# many seconds. By time, not by message: a worker whose equal-length jobs split into
# fragments (2 ending, then 30) must keep the prefetch of the larger fragment, or the
# fragments multiply (measured with bench/overhead.py's synthetic part).
BURST_HALF_LIFE_S = 2.0


class WorkerProcess(Protocol):
    """One started worker, as its launcher (launch.py) reports it; ``pid``, ``node``
    and ``host`` are None until it is placed."""

    slot: int

    @property
    def pid(self) -> int | None: ...

    @property
    def node(self) -> str | None: ...

    @property
    def host(self) -> str | None: ...

    @property
    def devices(self) -> list[int] | None:
        """The GPUs it was given on its machine (None: none, or not known yet)."""
        ...

    def is_pid(self, pid: int) -> bool:
        """Whether ``pid`` is this worker (a worker that speaks has been placed)."""
        ...


@dataclass(slots=True)
class Serving:
    """The slot's worker process once it said READY (the router's side of the record)."""

    pid: int
    identity: bytes
    capacity: int
    engine: str
    load_s: float
    max_seq_len: int | None
    describe: dict[str, Any]
    ready_at: float
    last_heartbeat: float
    progress: int = -1
    progress_at: float = 0.0
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    rate: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))
    burst: float = 0.0  # results per DONE message: a decaying peak (policy.prefetch_for)
    burst_at: float = 0.0
    # The engine's running totals from its heartbeats (wire.Beat.counters: prefix
    # hits, prefill tokens saved, ...); {} for an engine without a prefix cache.
    counters: dict[str, int] = field(default_factory=dict)

    def note_burst(self, results: int, now: float) -> None:
        # Up at once (the next batch must be on hand for the next wave), down slowly.
        decay = 0.5 ** ((now - self.burst_at) / BURST_HALF_LIFE_S)
        self.burst = max(results, self.burst * decay)
        self.burst_at = now

    def tokens_per_s(self, now: float, window_s: float = 10.0) -> float:
        samples = [s for s in self.rate if now - s[0] <= window_s]
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])


@dataclass(slots=True)
class Slot:
    id: int
    devices: list[int] | None  # None: a CPU slot (or, in Ray mode, until placed)
    resources: dict[str, float] | None = None  # what Ray must find for it (Ray mode)
    # The process (the supervisor's side), through its launcher.
    proc: WorkerProcess | None = None
    placed: bool = False  # the supervisor has noted where the process runs (below)
    node: str | None = None  # where the process runs: its Ray node id, or "local"
    host: str | None = None
    last_pid: int | None = None  # the process before this one, for the restart line
    state: str = STARTING
    restarts: int = 0
    deaths: deque[float] = field(default_factory=deque)
    next_start_at: float = 0.0
    spawned_at: float = 0.0
    kill_cause: str | None = None  # why we killed it, reported at its exit
    kill_blames_work: bool = True  # False: we killed it while the router itself lagged
    stopping: bool = False  # a commanded stop: its exit is not a crash
    boot_error: str | None = None  # the worker's FATAL message
    # When it exited with the boot-error code: never restarted, whether or not its
    # FATAL message has been read yet (the exit can be reaped first).
    boot_failed_at: float | None = None
    last_exit: str | None = None
    # The worker of the moment (the router's side); None until READY.
    serving: Serving | None = None
    loading_beat: float = 0.0  # last heartbeat while loading
    # Totals of the workers gone before, so the slot's counts survive restarts.
    history: dict[str, int] = field(
        default_factory=lambda: {"completed": 0, "failed": 0, "tokens": 0}
    )
    counters_history: dict[str, int] = field(default_factory=dict)  # engine counters, the same

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_process(self, pid: int) -> bool:
        """Whether ``pid`` is this slot's current process (a READY's check)."""
        return self.proc is not None and self.proc.is_pid(pid)

    def load(
        self, base_prefetch: int, outstanding: int, spare: int | None = None
    ) -> policy.WorkerLoad:
        """Its load; ``spare``: as ``policy.prefetch_for`` takes it."""
        assert self.serving is not None
        serving = self.serving
        prefetch = policy.prefetch_for(base_prefetch, serving.burst, serving.capacity, spare)
        return policy.WorkerLoad(self.id, outstanding, serving.capacity, prefetch)

    def retire_serving(self) -> None:
        """The worker is gone: fold its counts into the slot's history."""
        if self.serving is None:
            return
        self.history["completed"] += self.serving.completed
        self.history["failed"] += self.serving.failed
        self.history["tokens"] += self.serving.tokens
        for name, value in self.serving.counters.items():
            self.counters_history[name] = self.counters_history.get(name, 0) + value
        self.serving = None

    def counters(self) -> dict[str, int]:
        """The engine's counters over every worker this slot has had."""
        out = dict(self.counters_history)
        if self.serving is not None:
            for name, value in self.serving.counters.items():
                out[name] = out.get(name, 0) + value
        return out

    def totals(self) -> dict[str, int]:
        serving = self.serving
        if serving is None:
            return dict(self.history)
        return {
            "completed": self.history["completed"] + serving.completed,
            "failed": self.history["failed"] + serving.failed,
            "tokens": self.history["tokens"] + serving.tokens,
        }


class SlotTable:
    """Every slot by id, and the serving workers by their socket identity."""

    def __init__(self, slots: list[Slot]) -> None:
        self.by_id: dict[int, Slot] = {slot.id: slot for slot in slots}
        self.by_identity: dict[bytes, Slot] = {}
        self.engine = ""  # the engine the last worker to say READY runs (status, WELCOME)

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, slot_id: int) -> Slot | None:
        return self.by_id.get(slot_id)

    def serving(self) -> list[Slot]:
        return [slot for slot in self.by_id.values() if slot.serving is not None]

    def serving_identity(self, identity: bytes) -> Slot | None:
        """The slot whose *current* worker has this identity (not a dead one's)."""
        return self.by_identity.get(identity)

    def start_serving(self, slot: Slot, serving: Serving) -> None:
        if slot.serving is not None:
            self.by_identity.pop(slot.serving.identity, None)
        slot.serving = serving
        self.by_identity[serving.identity] = slot
        self.engine = serving.engine

    def stop_serving(self, slot: Slot) -> None:
        if slot.serving is not None:
            self.by_identity.pop(slot.serving.identity, None)
        slot.retire_serving()

    def count(self, state: str) -> int:
        return sum(1 for slot in self.by_id.values() if slot.state == state)
