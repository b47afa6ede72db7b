"""The router's rooms in-process, under random interleavings (hypothesis): submit,
dispatch, results, worker deaths, cancels, links that drop and come back, clients
that die. Whatever the order, every item a live client submitted ends in exactly
one answer that the client has (redeliveries of the same answer aside), a dead
client's work is dropped, and the ledger, the waiting room and the slots agree.
Plain data in, messages out (router_support.Network): no socket."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.net import wire
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import Slot, SlotTable
from tests.unit.router.router_support import Network

CLIENTS = [b"c-alice", b"c-bob", b"c-carol"]
SLOTS = 2
CAPACITY = 2


@dataclass
class ClientModel:
    identity: bytes
    submitted: set[str] = field(default_factory=set)
    answers: dict[str, list[Any]] = field(default_factory=dict)
    session: int | None = None
    contiguous: int = 0
    acked: int = 0
    alive: bool = True
    counter: itertools.count[int] = field(default_factory=itertools.count)


class RouterModel(RuleBasedStateMachine):
    hedge = False

    def __init__(self) -> None:
        super().__init__()
        self.table = SlotTable([Slot(i, None) for i in range(SLOTS)])
        config = Settings(
            client_grace_s=1.0, client_heartbeat_s=0.5, max_attempts=3, hedge=self.hedge
        )
        self.router = Router(config, self.table)
        self.net = Network(self.router)
        self.pids = itertools.count(1000)
        self.held: dict[int, set[int]] = {}  # slot -> keys its worker was given
        self.clients = {c: ClientModel(c) for c in CLIENTS}
        self.later = 0.0  # the leases' clock, which only goes forward
        for slot in self.table:
            self._start_worker(slot)

    # --- the world around the router ---------------------------------------------

    def _start_worker(self, slot: Slot) -> None:
        self.net.worker_ready(slot, next(self.pids), CAPACITY)
        self.held[slot.id] = set()

    def _flush(self) -> None:
        now = time.monotonic()
        self.router.flush_results(now)
        self.net.send(now)

    def _client_says(self, client: bytes, command: bytes, body: dict[str, Any]) -> None:
        self.net.client_says(client, command, body)
        self._flush()

    def _collect_work(self) -> None:
        for slot in self.table:
            if slot.serving is None:
                continue
            for command, body in self.net.take_worker(slot.serving.identity):
                if command == wire.WORK:
                    self.held[slot.id].update(job.key for job in wire.decode_work(body))
                elif command == wire.CANCEL:
                    self.held[slot.id].difference_update(wire.decode_cancel(body))

    def _read(self, model: ClientModel) -> None:
        """What the client receives: results (numbered), pongs; the fake library
        drops nothing and acknowledges as it goes, like the real one."""
        for command, body in self.net.take_client(model.identity):
            session = body.get("session")
            if command in (P.ACCEPTED, P.PONG, P.RESULTS) and session not in (None, model.session):
                self._new_session(model, session)
            if command == P.RESULTS:
                if body["seq"] == model.contiguous + 1:
                    model.contiguous = body["seq"]
                    for result in body["results"]:
                        model.answers.setdefault(result["id"], []).append(_outcome(result))
            elif command == P.PONG and body.get("seq", 0) > model.contiguous:
                self._ack(model, resend=True)
            elif command == P.PONG and body.get("known") is False:
                self._resubmit(model)  # the router holds nothing of ours: all again

    def _new_session(self, model: ClientModel, session: int) -> None:
        """The router forgot this client (its link was down past the grace): like the
        library, submit again whatever has no answer yet."""
        first = model.session is None
        model.session, model.contiguous = session, 0
        if not first:
            self._resubmit(model)

    def _resubmit(self, model: ClientModel) -> None:
        unanswered = sorted(model.submitted - set(model.answers))
        if unanswered:
            items = [{"id": i, "prompt": i} for i in unanswered]
            self._client_says(model.identity, P.SUBMIT, {"req": "again", "items": items})

    def _ack(self, model: ClientModel, resend: bool = False) -> None:
        if model.session is None:
            return
        body = {"session": model.session, "seq": model.contiguous, "resend": resend}
        self._client_says(model.identity, P.ACK, body)

    # --- rules ---------------------------------------------------------------------------

    @rule(client=st.sampled_from(CLIENTS), n=st.integers(1, 6), batch=st.booleans())
    def submit(self, client: bytes, n: int, batch: bool) -> None:
        model = self.clients[client]
        if not model.alive or client in self.net.gone:
            return
        ids = [f"{client.decode()}-{next(model.counter)}" for _ in range(n)]
        items = [{"id": i, "prompt": i, "params": {"max_new_tokens": len(i)}} for i in ids]
        priority = "batch" if batch else "interactive"
        self._client_says(client, P.SUBMIT, {"req": ids[0], "items": items, "priority": priority})
        model.submitted.update(ids)

    @rule()
    def dispatch(self) -> None:
        self.router.dispatch(time.monotonic())
        self.net.send()
        self._collect_work()

    @rule(slot_id=st.integers(0, SLOTS - 1), k=st.integers(1, 4), fail=st.booleans())
    def worker_answers(self, slot_id: int, k: int, fail: bool) -> None:
        slot = self.table.by_id[slot_id]
        self._collect_work()
        keys = sorted(self.held[slot_id])[:k]
        if slot.serving is None or not keys:
            return
        from exgen.daemon.engines.base import Failed, Finished

        finished = [] if fail else [Finished(key, f"text {key}", "length", 1, 2) for key in keys]
        failed = [Failed(key, P.E_ENGINE, "boom") for key in keys] if fail else []
        self.net.worker_says(slot.serving.identity, wire.pack_done(finished, failed))
        self.held[slot_id].difference_update(keys)
        self._flush()

    @rule(slot_id=st.integers(0, SLOTS - 1), blames=st.booleans())
    def worker_dies(self, slot_id: int, blames: bool) -> None:
        slot = self.table.by_id[slot_id]
        if slot.serving is None:
            return
        now = time.monotonic()
        self.router.on_worker_exit(slot_id, slot.serving.pid, "killed", True, now, blames)
        self._flush()
        self._start_worker(slot)

    @rule(client=st.sampled_from(CLIENTS), k=st.integers(1, 3))
    def client_cancels(self, client: bytes, k: int) -> None:
        model = self.clients[client]
        unanswered = sorted(model.submitted - set(model.answers))[:k]
        if model.alive and unanswered and client not in self.net.gone:
            self._client_says(client, P.CANCEL, {"req": "c", "ids": unanswered})

    @rule(client=st.sampled_from(CLIENTS))
    def client_reads(self, client: bytes) -> None:
        model = self.clients[client]
        if model.alive and client not in self.net.gone:
            self._read(model)
            self._ack(model)

    @rule(client=st.sampled_from(CLIENTS))
    def link_drops(self, client: bytes) -> None:
        """The link resets: what was in flight to the client is lost."""
        if self.clients[client].alive:
            self.net.to_clients.pop(client, None)
            self.net.gone.add(client)

    @rule(client=st.sampled_from(CLIENTS))
    def link_returns(self, client: bytes) -> None:
        model = self.clients[client]
        if model.alive and client in self.net.gone:
            self.net.gone.discard(client)
            self._client_says(client, P.PING, {"req": "p"})
            self._read(model)

    @precondition(lambda self: sum(m.alive for m in self.clients.values()) > 1)
    @rule(client=st.sampled_from(CLIENTS))
    def client_dies(self, client: bytes) -> None:
        model = self.clients[client]
        if not model.alive:
            return
        model.alive = False
        self.net.gone.add(client)
        for _ in range(2):  # found unreachable by a probe, then past the grace
            self.later = max(self.later, time.monotonic()) + 10
            self.router.tick(self.later)
            self.net.send(self.later)
        assert self.router.ledger.count_of(client) == 0, "a dead client's work is dropped"

    # --- what must hold ------------------------------------------------------------------

    @invariant()
    def rooms_agree(self) -> None:
        ledger = self.router.ledger
        for slot_id, keys in ledger.held.items():
            assert all(slot_id in ledger.holders(key) for key in keys)
        waiting = sum(1 for e in ledger.entries.values() if e.slot is None)
        assert self.router.queue.size == waiting, "every waiting entry waits exactly once"
        for model in self.clients.values():
            for item_id, outcomes in model.answers.items():
                assert len(set(outcomes)) == 1, f"{item_id} got two different answers"

    def teardown(self) -> None:
        """Run to the end: links back, workers finish everything, clients read."""
        for model in self.clients.values():
            if model.alive and model.identity in self.net.gone:
                self.link_returns(model.identity)
        for _ in range(200):
            self.dispatch()
            for slot in self.table:
                self.worker_answers(slot.id, 100, False)
            for model in self.clients.values():
                if model.alive:
                    self._client_says(model.identity, P.PING, {"req": "p"})
                    self._read(model)
                    self._ack(model)
            if not self.router.ledger.entries and all(not r.owed for r in self.router.clients):
                break
        assert not self.router.ledger.entries, "every accepted item was answered"
        for model in self.clients.values():
            if model.alive:
                missing = model.submitted - set(model.answers)
                assert not missing, f"{model.identity!r} never got {sorted(missing)[:5]}"


def _outcome(result: dict[str, Any]) -> str:
    error = result.get("error")
    return f"error:{error['code']}" if error else f"ok:{result['text']}"


RouterModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_router_model = RouterModel.TestCase


class HedgedRouterModel(RouterModel):
    """The same world with hedging on: idle workers copy running items; still exactly
    one answer each, whichever copy answers, fails or dies first."""

    hedge = True

    @rule(slot_id=st.integers(0, SLOTS - 1), fail=st.booleans())
    def worker_clears_then_copies(self, slot_id: int, fail: bool) -> None:
        """A worker answers all it holds and the router dispatches: where nothing
        waits, the idle worker takes copies of the other's items."""
        self.worker_answers(slot_id, 100, fail)
        self.dispatch()


HedgedRouterModel.TestCase.settings = RouterModel.TestCase.settings
test_hedged_router_model = HedgedRouterModel.TestCase
