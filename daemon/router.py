"""The router: client and worker sockets, the pending queue, the ledger.

- Pending queue: one lane per client, served round-robin, so a 100,000-line file
  never starves a one-line request. Within a lane the largest max_new_tokens goes
  first (``order = "longest-first"``, see Lane), else arrival order. Items requeued
  after a crash go first.
- Ledger: every accepted item has an entry (key → client, id, attempts, worker)
  until exactly one result or error has been sent for it. A result is taken only
  from the worker the ledger names, so a late result from a worker already given
  up for dead can never make a duplicate.
- Balancing: policy.plan_dispatch keeps each worker near capacity + prefetch; the
  prefetch grows to a batch for a worker whose jobs end in batches.
- Probation: an item that was on board two crashed workers runs alone on one
  worker (drained first), so a poison prompt is pinned down without costing the
  items that happened to share its batch.
- Blame: only a death that could have been caused by the work counts towards an
  item's max_attempts. A ``kill -9`` from outside (a SIGKILL we did not send while
  the kernel's OOM-kill counter stood still) requeues the items as they were:
  under random kills an innocent item would otherwise, now and then, be failed as
  poison after three unlucky kills (measured with bench/chaos.py).
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from exgen.client import protocol as P
from exgen.daemon import policy
from exgen.daemon.config import Settings
from exgen.daemon.sockets import readable

logger = logging.getLogger("exgen.router")

# WorkerInfo.burst, the most results a worker sent at once lately, halves every this
# many seconds. By time, not by message: a worker whose equal-length jobs split into
# fragments (2 ending, then 30) must keep the prefetch of the larger fragment, or the
# fragments multiply (measured with bench/overhead.py's synthetic part).
BURST_HALF_LIFE_S = 2.0
MAX_FRAMES_PER_TICK = 2000  # messages read from one socket before doing anything else
FRONTEND_BUDGET_S = 0.05  # client messages handled per tick, at most, in seconds


@dataclass(slots=True)
class Entry:
    key: int
    client: bytes
    item_id: str
    job: list[Any]  # the WORK row, built once at accept
    accepted_at: float
    attempts: int = 0
    worker: bytes | None = None
    causes: list[str] | None = None  # why the workers it was on died (poison verdicts)


@dataclass(slots=True)
class WorkerInfo:
    slot: int
    pid: int
    identity: bytes
    capacity: int
    engine: str
    load_s: float
    max_seq_len: int | None
    describe: dict[str, Any]
    ready_at: float
    outstanding: set[int] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    last_heartbeat: float = 0.0
    progress: int = -1
    progress_at: float = 0.0
    rate: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))
    burst: float = 0.0  # results per DONE message: a decaying peak (policy.prefetch_for)
    burst_at: float = 0.0

    def load(self, base_prefetch: int) -> policy.WorkerLoad:
        prefetch = policy.prefetch_for(base_prefetch, self.burst, self.capacity)
        return policy.WorkerLoad(self.slot, len(self.outstanding), self.capacity, prefetch)

    def tokens_per_s(self, now: float, window_s: float = 10.0) -> float:
        samples = [s for s in self.rate if now - s[0] <= window_s]
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])


@dataclass(slots=True)
class Kill:
    slot: int
    pid: int
    cause: str


class Lane:
    """One client's waiting items: the largest token budget first, else arrival order.

    Longest-first by ``max_new_tokens`` (the classic LPT rule): a long generation
    started last is what leaves the other devices idle at the end of a job, and the
    budget is the only length the router knows before generating. Items with equal
    budgets keep their arrival order, and a lane whose items all share one budget
    (the common case: one file, one setting) stays a plain FIFO at deque cost.
    With ``longest_first`` False the lane is always FIFO.
    """

    __slots__ = ("budget", "fifo", "heap", "longest_first", "seq")

    def __init__(self, longest_first: bool) -> None:
        self.fifo: deque[int] = deque()
        self.heap: list[tuple[int, int, int]] | None = None  # (-budget, seq, key)
        self.budget: int | None = None  # the one budget while FIFO
        self.longest_first = longest_first
        self.seq = 0

    def __len__(self) -> int:
        return len(self.fifo) if self.heap is None else len(self.heap)

    def push(self, key: int, budget: int) -> None:
        if self.heap is None:
            if not self.longest_first or self.budget in (None, budget) or not self.fifo:
                self.budget = budget if self.longest_first else None
                self.fifo.append(key)
                return
            self._to_heap()
        assert self.heap is not None
        self.seq += 1
        heapq.heappush(self.heap, (-budget, self.seq, key))

    def pop(self) -> int:
        if self.heap is None:
            return self.fifo.popleft()
        key = heapq.heappop(self.heap)[2]
        if not self.heap:
            self.heap, self.budget = None, None  # empty: back to the cheap FIFO
        return key

    def discard(self, keys: set[int]) -> None:
        """Drop these keys; the others keep their places."""
        if self.heap is None:
            self.fifo = deque(k for k in self.fifo if k not in keys)
            return
        self.heap = [entry for entry in self.heap if entry[2] not in keys]
        heapq.heapify(self.heap)
        if not self.heap:
            self.heap, self.budget = None, None

    def in_order(self) -> list[int]:
        """Every key, in the order they would be taken."""
        if self.heap is None:
            return list(self.fifo)
        return [entry[2] for entry in sorted(self.heap)]

    def _to_heap(self) -> None:
        budget = self.budget or 0
        self.heap = []
        for key in self.fifo:
            self.seq += 1
            self.heap.append((-budget, self.seq, key))
        self.fifo.clear()  # already in heap order: equal budgets, rising seq


class FairQueue:
    """Per-client lanes served round-robin, plus a priority lane served first."""

    def __init__(self, longest_first: bool = True) -> None:
        self.by_client: OrderedDict[bytes, Lane] = OrderedDict()
        self.front: deque[int] = deque()
        self.size = 0
        self.longest_first = longest_first

    def waiting(self, client: bytes) -> int:
        lane = self.by_client.get(client)
        return len(lane) if lane is not None else 0

    def push(self, client: bytes, key: int, budget: int = 0) -> None:
        lane = self.by_client.get(client)
        if lane is None:
            lane = self.by_client[client] = Lane(self.longest_first)
        lane.push(key, budget)
        self.size += 1

    def push_front(self, keys: Iterable[int]) -> None:
        for key in keys:
            self.front.appendleft(key)
            self.size += 1

    def take(self, n: int) -> list[int]:
        """Up to ``n`` keys: the front lane, then one per client in turn."""
        out: list[int] = []
        while self.front and len(out) < n:
            out.append(self.front.popleft())
        lanes = self.by_client
        while lanes and len(out) < n:
            # One round: each client gets an equal share of what is left.
            share = max(1, (n - len(out)) // len(lanes))
            for client in list(lanes):
                lane = lanes[client]
                for _ in range(min(share, len(lane), n - len(out))):
                    out.append(lane.pop())
                if lane:
                    lanes.move_to_end(client)
                else:
                    del lanes[client]
                if len(out) >= n:
                    break
        self.size -= len(out)
        return out

    def remove(self, keys: set[int]) -> None:
        """Drop keys wherever they wait (cancel); cost is linear, cancels are rare."""
        self.front = deque(k for k in self.front if k not in keys)
        for client in list(self.by_client):
            lane = self.by_client[client]
            lane.discard(keys)
            if not lane:
                del self.by_client[client]
        self.size = len(self.front) + sum(len(lane) for lane in self.by_client.values())

    def drain_all(self) -> list[int]:
        keys = list(self.front)
        for lane in self.by_client.values():
            keys.extend(lane.in_order())
        self.front.clear()
        self.by_client.clear()
        self.size = 0
        return keys


class Router:
    def __init__(
        self, settings: Settings, frontend: zmq.Socket[Any], backend: zmq.Socket[Any]
    ) -> None:
        self.settings = settings
        self.frontend = frontend
        self.backend = backend
        self.instance = uuid.uuid4().hex
        self.started = time.monotonic()
        self.entries: dict[int, Entry] = {}
        self.by_client_id: dict[tuple[bytes, str], int] = {}
        self.queue = FairQueue(longest_first=settings.order == "longest-first")
        self.probation: deque[int] = deque()
        self.isolating: int | None = None  # the slot kept free for probation items
        self.workers: dict[int, WorkerInfo] = {}  # by slot
        self.by_identity: dict[bytes, WorkerInfo] = {}
        self.loading_beats: dict[int, float] = {}  # slot → last heartbeat while loading
        # Counts of workers gone before, so a slot's totals survive its restarts.
        self.slot_history: dict[int, dict[str, int]] = {}
        self.next_key = 0
        self.draining = False
        self.completed = 0
        self.failed = 0
        self.garbage_frames = 0
        self.outbox: dict[bytes, list[dict[str, Any]]] = {}  # results waiting for the flush
        self.engine_name = ""
        self.model_name = ""
        # Hooks the daemon wires to the supervisor.
        self.on_worker_ready: Callable[[int, int], bool] = lambda slot, pid: True
        self.on_boot_error: Callable[[int, str], None] = lambda slot, message: None
        self.status_provider: Callable[[float], dict[str, Any]] = self.status
        # Accept → result seconds, for the metrics (which empty it); None when off.
        self.latencies: list[float] | None = None

    # --- client side ------------------------------------------------------------

    def handle_frontend(self, now: float) -> None:
        # A time budget as well as a count: a flood of big submits must not keep the
        # loop from workers' heartbeats and from dispatching (what is left waits).
        budget_end = time.monotonic() + FRONTEND_BUDGET_S
        for _ in range(MAX_FRAMES_PER_TICK):
            if not readable(self.frontend):
                return
            self._client_message(self.frontend.recv_multipart(), now)
            if time.monotonic() > budget_end:
                return

    def _client_message(self, frames: list[bytes], now: float) -> None:
        if len(frames) < 2:
            self.garbage_frames += 1
            return
        client, rest = frames[0], frames[1:]
        try:
            command, body = P.unpack(rest)
        except P.FrameError as exc:
            self._on_bad_frames(client, rest, exc)
            return
        req = body.get("req") if isinstance(body.get("req"), str) else None
        try:
            if command == P.SUBMIT:
                self._submit(client, body, now)
            elif command == P.CANCEL:
                self._cancel(client, body)
            elif command == P.STATUS:
                self.reply(client, P.STATUS_REPLY, {**self.status_provider(now), "req": req})
            elif command == P.PING:
                self.reply(
                    client,
                    P.PONG,
                    {"req": req, "instance": self.instance, "draining": self.draining},
                )
            else:
                self.reply_error(client, P.E_BAD_REQUEST, f"unknown command {command!r}", req=req)
        except P.ValidationError as exc:
            self.reply_error(client, P.E_BAD_REQUEST, exc.message, req=req, field_name=exc.field)

    def _on_bad_frames(self, client: bytes, frames: list[bytes], exc: P.FrameError) -> None:
        """Garbage is dropped; a peer that speaks our protocol badly is told why."""
        self.garbage_frames += 1
        if frames and frames[0][:3] == P.MAGIC:
            self.reply_error(client, P.E_PROTOCOL, str(exc))
        else:
            logger.debug("dropped %d garbage frame(s) from a client", len(frames))

    def _submit(self, client: bytes, body: dict[str, Any], now: float) -> None:
        # Refuse before validating: under a flood, checking thousands of items only
        # to answer "busy" would become the router's main work.
        peeked = _peek_ids(body)
        if peeked is not None and self._refused(client, body["req"], peeked):
            return
        submit = P.validate_submit(body)
        if self._refused(client, submit.req, [item.id for item in submit.items]):
            return
        accepted = 0
        for item in submit.items:
            if (client, item.id) in self.by_client_id:
                continue  # a resend of something we already have: answered once
            self._accept(client, item, submit.stream, now)
            accepted += 1
        if submit.rejected:
            results = [
                P.result_error(i, P.E_BAD_REQUEST, e.message, e.field) for i, e in submit.rejected
            ]
            self.reply(client, P.RESULTS, {"req": submit.req, "results": results})
            self.failed += len(results)
        self.reply(
            client,
            P.ACCEPTED,
            {
                "req": submit.req,
                "n": accepted,
                "queued": self.queue.size,
                "instance": self.instance,
                "model": self.model_name,
            },
        )

    def _refused(self, client: bytes, req: str, ids: list[str]) -> bool:
        """Draining or busy: the items are handed back (the client library resends)."""
        if self.draining:
            message = "the daemon is shutting down"
            self.reply_error(client, P.E_DRAINING, message, req=req, items=ids)
            return True
        if self._queue_full(client, len(ids)):
            message = f"queue full ({self.queue.size} items waiting)"
            self.reply_error(client, P.E_BUSY, message, req=req, items=ids)
            return True
        return False

    def _queue_full(self, client: bytes, n: int) -> bool:
        """Busy? The last tenth of the queue is kept for clients with nothing waiting,
        so one client flooding the queue full never locks a one-line request out."""
        limit = self.settings.max_queue
        if self.queue.waiting(client) == 0:
            limit += max(1, limit // 10)
        return self.queue.size + n > limit

    def _accept(self, client: bytes, item: P.Item, stream: bool, now: float) -> None:
        key = self.next_key
        self.next_key += 1
        # The worker's job row straight from the validated item (protocol.WORK).
        job = [key, item.prompt, item.messages, item.params, stream]
        self.entries[key] = Entry(key, client, item.id, job, now)
        self.by_client_id[(client, item.id)] = key
        budget = item.params.get("max_new_tokens", P.DEFAULT_PARAMS["max_new_tokens"])
        self.queue.push(client, key, budget)

    def _cancel(self, client: bytes, body: dict[str, Any]) -> None:
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise P.ValidationError("ids", "must be a list of item ids")
        keys = {self.by_client_id[(client, i)] for i in ids if (client, i) in self.by_client_id}
        self.queue.remove(keys)
        self.probation = deque(k for k in self.probation if k not in keys)
        by_worker: dict[bytes, list[int]] = {}
        for key in keys:
            entry = self.entries[key]
            if entry.worker is not None:
                by_worker.setdefault(entry.worker, []).append(key)
                worker = self.by_identity.get(entry.worker)
                if worker is not None:
                    worker.outstanding.discard(key)
        for identity, worker_keys in by_worker.items():
            self.backend.send_multipart([identity, *P.pack(P.CANCEL, {"keys": worker_keys})])
        self._finish_with_error(keys, P.E_CANCELLED, "cancelled by the client")

    def reply(self, client: bytes, command: bytes, body: dict[str, Any]) -> None:
        self.frontend.send_multipart([client, *P.pack(command, body)])

    def reply_error(
        self,
        client: bytes,
        code: str,
        message: str,
        *,
        req: str | None = None,
        field_name: str | None = None,
        items: list[str] | None = None,
    ) -> None:
        body = P.error_body(code, message, req=req, field_name=field_name)
        if items is not None:
            body["items"] = items
        body["instance"] = self.instance
        self.reply(client, P.ERROR, body)

    # --- worker side ------------------------------------------------------------

    def handle_backend(self, now: float) -> None:
        try:
            for _ in range(MAX_FRAMES_PER_TICK):
                if not readable(self.backend):
                    return
                frames = self.backend.recv_multipart()
                try:
                    command, body = P.unpack(frames[1:])
                except P.FrameError as exc:
                    logger.error("bad frames from a worker: %s", exc)
                    continue
                self._worker_message(frames[0], command, body, now)
        finally:
            self._flush_results()

    def _flush_results(self) -> None:
        """One RESULTS message per client per tick (the outbox ``_on_done`` fills).

        Each send costs a wakeup of ZMQ's I/O thread (a syscall, and on a busy host a
        context switch): per-worker messages to the same client cost more than the
        results themselves once workers answer faster than the router ticks.
        """
        outbox, self.outbox = self.outbox, {}
        for client, batch in outbox.items():
            self.reply(client, P.RESULTS, {"results": batch})

    def _worker_message(
        self, identity: bytes, command: bytes, body: dict[str, Any], now: float
    ) -> None:
        try:
            self._dispatch_worker_message(identity, command, body, now)
        except (KeyError, TypeError, ValueError) as exc:
            # Workers are our own code, but a bad message must not take the router down.
            logger.error("bad %r message from a worker: %r", command, exc)

    def _dispatch_worker_message(
        self, identity: bytes, command: bytes, body: dict[str, Any], now: float
    ) -> None:
        if command == P.DONE:
            self._on_done(identity, body["done"], body["failed"], now)
        elif command == P.CHUNKS:
            self._on_chunks(identity, body["chunks"])
        elif command == P.HEARTBEAT:
            self._on_heartbeat(body, now)
        elif command == P.READY:
            self._on_ready(identity, body, now)
        elif command == P.FATAL:
            self.on_boot_error(int(body["slot"]), str(body["message"]))

    def _on_ready(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        slot, pid = int(body["slot"]), int(body["pid"])
        if not self.on_worker_ready(slot, pid):
            logger.warning("READY from slot %d pid %d, which is not that slot's process", slot, pid)
            return
        capacity = max(1, int(body["capacity"]))
        worker = WorkerInfo(
            slot=slot,
            pid=pid,
            identity=identity,
            capacity=capacity,
            engine=str(body.get("engine")),
            load_s=float(body.get("load_s", 0.0)),
            max_seq_len=body.get("max_seq_len"),
            describe=body.get("describe") or {},
            ready_at=now,
            last_heartbeat=now,
            progress_at=now,
        )
        self.workers[slot] = worker
        self.by_identity[identity] = worker
        self.loading_beats.pop(slot, None)
        self.engine_name = worker.engine
        self.model_name = str(worker.describe.get("model", ""))
        logger.info(
            "ready slot %d pid %d: %s, capacity %d, loaded in %.2fs",
            slot,
            pid,
            worker.engine,
            capacity,
            worker.load_s,
        )

    def _on_heartbeat(self, body: dict[str, Any], now: float) -> None:
        slot, pid = int(body["slot"]), int(body["pid"])
        worker = self.workers.get(slot)
        if worker is None or worker.pid != pid:
            self.loading_beats[slot] = now
            return
        worker.last_heartbeat = now
        progress = int(body.get("progress", 0))
        if progress != worker.progress:
            worker.progress = progress
            worker.progress_at = now
        worker.tokens = int(body.get("tokens", worker.tokens))
        worker.rate.append((now, worker.tokens))

    def _on_done(
        self, identity: bytes, done: list[list[Any]], failed: list[list[Any]], now: float
    ) -> None:
        worker = self.by_identity.get(identity)
        if worker is not None:
            # Up at once (the next batch must be on hand for the next wave), down slowly.
            decay = 0.5 ** ((now - worker.burst_at) / BURST_HALF_LIFE_S)
            worker.burst = max(len(done) + len(failed), worker.burst * decay)
            worker.burst_at = now
        slot = worker.slot if worker is not None else None
        for key, text, finish_reason, prompt_tokens, completion_tokens in done:
            entry = self._settle(identity, worker, key, now, ok=True)
            if entry is None:
                continue
            self.outbox.setdefault(entry.client, []).append(
                {
                    "id": entry.item_id,
                    "text": text,
                    "finish_reason": finish_reason,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "slot": slot,
                    "error": None,
                }
            )
        for key, code, message in failed:
            entry = self._settle(identity, worker, key, now, ok=False)
            if entry is None:
                continue
            wire = P.result_error(entry.item_id, str(code), str(message))
            wire["slot"] = slot
            self.outbox.setdefault(entry.client, []).append(wire)

    def _settle(
        self, identity: bytes, worker: WorkerInfo | None, key: int, now: float, ok: bool
    ) -> Entry | None:
        """The ledger entry a worker's answer settles, counted; None if not that worker's."""
        entry = self.entries.get(key)
        if entry is None or entry.worker != identity:
            return None  # cancelled, or a late result from a worker given up for dead
        self._forget(entry)
        if self.latencies is not None:
            self.latencies.append(now - entry.accepted_at)
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        if worker is not None:
            worker.outstanding.discard(key)
            worker.progress_at = now
            if ok:
                worker.completed += 1
            else:
                worker.failed += 1
        return entry

    def _on_chunks(self, identity: bytes, chunks: list[list[Any]]) -> None:
        out: dict[bytes, list[list[Any]]] = {}
        for key, text in chunks:
            entry = self.entries.get(key)
            if entry is not None and entry.worker == identity:
                out.setdefault(entry.client, []).append([entry.item_id, text])
        for client, batch in out.items():
            self.reply(client, P.CHUNKS, {"chunks": batch})

    def _forget(self, entry: Entry) -> None:
        del self.entries[entry.key]
        self.by_client_id.pop((entry.client, entry.item_id), None)

    def _finish_with_error(self, keys: Iterable[int], code: str, message: str) -> None:
        out: dict[bytes, list[dict[str, Any]]] = {}
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                continue
            self._forget(entry)
            self.failed += 1
            out.setdefault(entry.client, []).append(P.result_error(entry.item_id, code, message))
        for client, batch in out.items():
            self.reply(client, P.RESULTS, {"results": batch})

    # --- dispatch ----------------------------------------------------------------

    def dispatch(self) -> None:
        if self.draining or not self.workers:
            return
        self._dispatch_probation()
        if self.queue.size == 0:
            return
        base = self.settings.prefetch
        loads = [w.load(base) for w in self.workers.values() if w.slot != self.isolating]
        plan = policy.plan_dispatch(loads, self.queue.size, self.settings.prefetch)
        for slot, count in plan.items():
            self._send_work(self.workers[slot], self.queue.take(count))

    def _dispatch_probation(self) -> None:
        """Items that shared two crashes run alone, on a worker drained for them."""
        if not self.probation:
            self.isolating = None
            return
        worker = self.workers.get(self.isolating) if self.isolating is not None else None
        if worker is None:
            best = min(self.workers.values(), key=lambda w: (len(w.outstanding), w.slot))
            worker = best
            self.isolating = best.slot
        if not worker.outstanding:
            self._send_work(worker, [self.probation.popleft()])

    def _send_work(self, worker: WorkerInfo, keys: list[int]) -> None:
        if not keys:
            return
        if not worker.outstanding:
            worker.progress_at = time.monotonic()  # idle time is not a lack of progress
        jobs = []
        for key in keys:
            entry = self.entries[key]
            entry.worker = worker.identity
            worker.outstanding.add(key)
            jobs.append(entry.job)
        self.backend.send_multipart([worker.identity, *P.pack(P.WORK, {"jobs": jobs})])

    # --- liveness ----------------------------------------------------------------

    def did_work(self, slot: int, pid: int) -> bool:
        """Whether this slot's worker ``pid`` finished any item (it was not crash-looping)."""
        worker = self.workers.get(slot)
        return worker is not None and worker.pid == pid and worker.completed + worker.failed > 0

    def worker_lost(
        self, slot: int, pid: int, cause: str, crashed: bool, blames_work: bool = True
    ) -> None:
        """A worker process is gone: its items go back first, or fail if poison."""
        worker = self.workers.get(slot)
        if worker is None or worker.pid != pid:
            return
        del self.workers[slot]
        self.by_identity.pop(worker.identity, None)
        history = self.slot_history.setdefault(slot, {"completed": 0, "failed": 0, "tokens": 0})
        history["completed"] += worker.completed
        history["failed"] += worker.failed
        history["tokens"] += worker.tokens
        if self.isolating == slot:
            self.isolating = None
        requeue: list[int] = []
        alone = len(worker.outstanding) == 1
        for key in sorted(worker.outstanding):
            entry = self.entries.get(key)
            if entry is None:
                continue
            entry.worker = None
            if crashed and blames_work:
                entry.attempts += 1
                entry.causes = [*(entry.causes or ()), cause]
            verdict = policy.poison_verdict(entry.attempts, self.settings.max_attempts, alone)
            if verdict == policy.FAIL:
                self._fail_poison(entry)
            elif verdict == policy.PROBATION:
                self.probation.append(key)
            else:
                requeue.append(key)
        self.queue.push_front(reversed(requeue))
        if requeue or worker.outstanding:
            logger.warning(
                "slot %d pid %d lost with %d items in flight: %d requeued, %d on probation",
                slot,
                pid,
                len(worker.outstanding),
                len(requeue),
                len(self.probation),
            )

    def _fail_poison(self, entry: Entry) -> None:
        message = (
            f"crashed a worker {entry.attempts} times; giving up on it "
            f"(last: {entry.causes[-1] if entry.causes else 'unknown'})"
        )
        logger.error("item %r from a client: %s", entry.item_id, message)
        self._finish_with_error([entry.key], P.E_WORKER_DIED, message)

    def check_liveness(self, now: float, loading_since: dict[int, tuple[int, float]]) -> list[Kill]:
        """Workers to kill: frozen (no heartbeats) or hung (no progress with work)."""
        kills = []
        hb_timeout = self.settings.heartbeat_timeout_s
        for worker in self.workers.values():
            silent = now - worker.last_heartbeat
            if silent > hb_timeout:
                kills.append(
                    Kill(worker.slot, worker.pid, f"missed heartbeats for {silent:.0f}s (frozen?)")
                )
            elif worker.outstanding and now - worker.progress_at > self.settings.progress_timeout_s:
                stuck = now - worker.progress_at
                kills.append(
                    Kill(worker.slot, worker.pid, f"no progress for {stuck:.0f}s (engine hung?)")
                )
        for slot, (pid, spawned_at) in loading_since.items():
            last = max(self.loading_beats.get(slot, 0.0), spawned_at + max(30.0, hb_timeout))
            if slot not in self.workers and now - last > hb_timeout:
                kills.append(
                    Kill(slot, pid, f"missed heartbeats while loading for {now - last:.0f}s")
                )
        return kills

    # --- draining ----------------------------------------------------------------

    def start_draining(self) -> None:
        """Take no new work; tell clients their waiting items were not started."""
        self.draining = True
        waiting = self.queue.drain_all() + list(self.probation)
        self.probation.clear()
        self.release(waiting, "the daemon is shutting down; item not started")

    def release(self, keys: list[int], message: str) -> None:
        """Answer items with a retryable draining error (the client library resends)."""
        by_client: dict[bytes, list[str]] = {}
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                continue
            self._forget(entry)
            by_client.setdefault(entry.client, []).append(entry.item_id)
        for client, ids in by_client.items():
            self.reply_error(client, P.E_DRAINING, message, items=ids)

    @property
    def inflight(self) -> int:
        return sum(len(w.outstanding) for w in self.workers.values())

    # --- status --------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "protocol": P.PROTOCOL_VERSION,
            "uptime_s": round(now - self.started, 3),
            "draining": self.draining,
            "queued": self.queue.size + len(self.probation),
            "inflight": self.inflight,
            "completed": self.completed,
            "failed": self.failed,
            "engine": self.engine_name,
            "model": self.model_name,
            "workers": [],  # filled in by the daemon, which knows the slots
        }

    def worker_status(self, slot: int, now: float) -> dict[str, Any]:
        history = self.slot_history.get(slot, {"completed": 0, "failed": 0, "tokens": 0})
        worker = self.workers.get(slot)
        if worker is None:
            return {**history, "inflight": 0, "tokens_per_s": 0.0}
        return {
            "inflight": len(worker.outstanding),
            "completed": history["completed"] + worker.completed,
            "failed": history["failed"] + worker.failed,
            "tokens": history["tokens"] + worker.tokens,
            "tokens_per_s": round(worker.tokens_per_s(now), 1),
            "capacity": worker.capacity,
            "engine": worker.engine,
            "load_s": worker.load_s,
            "max_seq_len": worker.max_seq_len,
        }


def _peek_ids(body: dict[str, Any]) -> list[str] | None:
    """The item ids of a plausible submit, without validating the items; else None."""
    items = body.get("items")
    if not isinstance(body.get("req"), str) or not isinstance(items, list):
        return None
    if not items or len(items) > P.MAX_ITEMS_PER_SUBMIT:
        return None
    return [i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)]
