"""Policy as pure functions: balancing, back-off, exit causes. No sockets, no clocks.

Balancing rule: no worker sits idle while work waits, and none holds a deep private
queue while another is idle. So keep each worker's outstanding work near its
capacity — the engine's concurrent-sequence limit — and never deeper than capacity
plus a small prefetch. New work goes to the worker with the least outstanding work
per unit of capacity.

The prefetch is what covers the round trip to the router: jobs a worker can start
the moment others end, before the refill arrives. A worker whose jobs end one at a
time needs two; one whose jobs end together (a static batch, a wave of equal-length
jobs) needs a whole batch, or each wave starts part-empty (see ``prefetch_for``).
"""

from __future__ import annotations

import heapq
import signal
from collections.abc import Sequence
from dataclasses import dataclass

EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # the engine cannot load: never restart (gunicorn's WORKER_BOOT_ERROR)
EXIT_PARENT_GONE = 4  # the supervisor vanished; the worker stopped itself


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    slot: int
    outstanding: int
    capacity: int
    prefetch: int | None = None  # this worker's own prefetch; None: plan_dispatch's


def prefetch_for(base: int, burst: float, capacity: int, spare: int | None = None) -> int:
    """Items a worker may hold beyond its capacity: ``base``, or as many as it ends at once.

    ``burst`` is the most jobs the worker reported finished at once lately. A
    worker finishing them a few at a time keeps the small base prefetch; one finishing
    whole batches together gets up to one batch more, so the next batch is on hand
    when the last one ends instead of a round trip later.

    ``spare``: the items waiting past what every worker can run at once (None: no
    bound). A prefetch past the base comes only from them: near the end of a job, the
    worker that ends its batch first would otherwise take the next batch and a batch
    of prefetch, and a worker ending its own batch a moment later would find nothing
    (2 workers of capacity 128: all 252 waiting items went to one, bench/RESULTS.md).
    """
    extra = min(capacity, round(burst))
    if spare is not None:
        extra = min(extra, base + spare)
    return max(base, extra)


def room(load: WorkerLoad, prefetch: int) -> int:
    """How many more items this worker may hold."""
    own = prefetch if load.prefetch is None else max(prefetch, load.prefetch)
    return max(0, load.capacity + own - load.outstanding)


def plan_dispatch(loads: Sequence[WorkerLoad], queued: int, prefetch: int) -> dict[int, int]:
    """How many of ``queued`` items to send to each slot now.

    Water-filling: each item goes to the worker with the lowest (outstanding + planned)
    ÷ capacity, ties to the lower slot; a worker past capacity + prefetch (its own, if
    larger) gets none. Every worker is filled to capacity before any gets a prefetch.
    """
    limits = {load.slot: load.outstanding + room(load, prefetch) for load in loads}
    heap = [
        (load.outstanding / load.capacity, load.slot, load.outstanding, load.capacity)
        for load in loads
        if load.capacity > 0 and room(load, prefetch) > 0
    ]
    heapq.heapify(heap)
    plan: dict[int, int] = {}
    while queued > 0 and heap:
        _, slot, outstanding, capacity = heapq.heappop(heap)
        # Take a run of items at once while this worker stays the least loaded.
        limit = limits[slot] - outstanding
        if heap:
            next_ratio = heap[0][0]
            within = max(1, int(next_ratio * capacity) - outstanding + 1)
            limit = min(limit, within)
        take = min(limit, queued)
        plan[slot] = plan.get(slot, 0) + take
        queued -= take
        outstanding += take
        if outstanding < limits[slot]:
            heapq.heappush(heap, (outstanding / capacity, slot, outstanding, capacity))
    return plan


REQUEUE = "requeue"
PROBATION = "probation"
FAIL = "fail"
ISOLATE_AFTER_ATTEMPTS = 2


def poison_verdict(attempts: int, max_attempts: int, alone: bool) -> str:
    """What to do with an item whose worker died (``attempts`` counts that death).

    Two shared deaths (one, if max_attempts is 2) put an item on probation: it runs
    alone. It fails only once it has used up max_attempts *and* the last death came
    while it ran alone, so the items that merely shared a poison prompt's batch are
    never failed with it. max_attempts 1 means no second chance for anyone.
    """
    if attempts >= max_attempts and (alone or max_attempts == 1):
        return FAIL
    if attempts > 0 and attempts >= min(ISOLATE_AFTER_ATTEMPTS, max_attempts - 1):
        return PROBATION
    return REQUEUE


def restart_delay(recent_deaths: int, base_s: float, cap_s: float) -> float:
    """Exponential back-off on deaths within the flapping window: base, 2×base, … ≤ cap."""
    if recent_deaths <= 0:
        return 0.0
    return float(min(cap_s, base_s * 2 ** (recent_deaths - 1)))


def death_blames_work(returncode: int, killed_by_us: bool, oom_kill_seen: bool | None) -> bool:
    """Whether a worker's death counts against the items it held (towards max_attempts).

    It does unless the death says nothing about the work: a SIGKILL the daemon did
    not send while the kernel's OOM-kill counter stood still was sent by a person or
    a script (``kill -9``), not caused by a prompt. ``oom_kill_seen`` None (the
    counter cannot be read) keeps the cautious answer: it counts. Our own kills
    (hung, frozen) count: the work on board is what wedged the engine.
    """
    external_sigkill = returncode == -signal.SIGKILL and not killed_by_us
    return not (external_sigkill and oom_kill_seen is False)


def describe_exit(returncode: int, oom_kill_seen: bool | None = None) -> str:
    """A death in words: the exit code or the signal, with the likely cause."""
    if returncode < 0:
        signum = -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if signum == signal.SIGKILL:
            if oom_kill_seen is None:
                return f"killed by {name} (out of memory, or killed by hand?)"
            if oom_kill_seen:
                return f"killed by {name} (the kernel's OOM killer acted: out of memory?)"
            return f"killed by {name} (from outside: not the OOM killer)"
        if signum == signal.SIGSEGV:
            return f"killed by {name} (a crash in native code)"
        return f"killed by {name}"
    if returncode == EXIT_BOOT_ERROR:
        return "boot error (exit 3): the engine cannot load"
    if returncode == EXIT_PARENT_GONE:
        return "stopped itself: the supervisor went away"
    return f"exited with code {returncode}"
