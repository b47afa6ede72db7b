"""Delivery, the client's side over a real link: results survive a TCP
connection that resets mid-stream. A small router of the test's own speaks the
delivery contract of docs/protocol.md (RESULTS with seq, kept until acknowledged,
sent again on ACK resend; PONG with seq and known), behind the tests' TCP proxy
(tests/proxy.py, ``cut_after``) that cuts the connection once while results flow. The
client must find the gap, ask for the lost results, drop the duplicates, and
acknowledge in batches."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
import zmq

from exgen.client import Client
from exgen.client import protocol as P
from exgen.client.core import ACK_EVERY
from tests.netutil import free_port
from tests.proxy import Proxy

pytestmark = pytest.mark.timeout(60)

RESULTS_PER_MESSAGE = 4
SESSION = {"session": 41}


class ContractRouter:
    """RESULTS carry seq and stay owed until acknowledged; ACK resend sends them again."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # As the real frontend (daemon/net/listen.py): the client reconnects under its fixed
        # identity, and without handover a reconnect that beats the old connection's
        # teardown (a loaded machine) is ignored by libzmq for good, so the client
        # would hear nothing and time out, a failure of this router, not of the client.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.owed: dict[int, dict[str, Any]] = {}  # seq -> RESULTS body, until acknowledged
        self.seq = 0
        self.acks: list[dict[str, Any]] = []
        self.seen_ids: set[str] = set()
        self.results_messages = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.ctx.term()

    def _send(self, peer: bytes, command: bytes, body: dict[str, Any]) -> None:
        self.sock.send_multipart([peer, *P.pack(command, body)])

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            peer, *frames = self.sock.recv_multipart()
            command, body = P.unpack(frames)
            if command == P.SUBMIT:
                self._submit(peer, body)
            elif command == P.PING:
                pong = {"req": body.get("req"), "instance": "i1", "draining": False}
                self._send(peer, P.PONG, {**pong, **SESSION, "seq": self.seq, "known": True})
            elif command == P.ACK:
                self._ack(peer, body)
            elif command == P.HELLO:
                welcome = {"req": body["req"], "instance": "i1", "client": "c1", **SESSION}
                self._send(peer, P.WELCOME, welcome)

    def _submit(self, peer: bytes, body: dict[str, Any]) -> None:
        # A resubmit of ids it holds is answered once, as the real router does.
        items = [it for it in body["items"] if it["id"] not in self.seen_ids]
        self.seen_ids.update(it["id"] for it in items)
        accepted = {"req": body["req"], "n": len(items), "queued": 0, "instance": "i1", **SESSION}
        self._send(peer, P.ACCEPTED, {**accepted, "model": "m"})
        for i in range(0, len(items), RESULTS_PER_MESSAGE):
            self.seq += 1
            results = [
                {"id": it["id"], "text": f"answer to {it['prompt']}", "finish_reason": "stop",
                 "prompt_tokens": 1, "completion_tokens": 3, "slot": 0, "error": None}
                for it in items[i : i + RESULTS_PER_MESSAGE]
            ]  # fmt: skip
            self.owed[self.seq] = {**SESSION, "seq": self.seq, "results": results}
            self.results_messages += 1
            self._send(peer, P.RESULTS, self.owed[self.seq])

    def _ack(self, peer: bytes, body: dict[str, Any]) -> None:
        self.acks.append(body)
        if body.get("session") != SESSION["session"]:
            return  # another session's: ignored, as the real router does
        upto = int(body["seq"])
        for seq in [s for s in self.owed if s <= upto]:
            del self.owed[seq]
        if body.get("resend"):
            for seq in sorted(self.owed):
                self._send(peer, P.RESULTS, self.owed[seq])


def test_results_lost_to_a_reset_link_are_asked_for_and_delivered_once():
    router = ContractRouter()
    proxy = Proxy(("127.0.0.1", router.port), cut_after=20_000)
    items = [{"id": f"i{k}", "prompt": f"p{k}"} for k in range(3000)]
    try:
        with Client(proxy.address, timeout=20) as client:
            results = list(client.iter_results(items, max_new_tokens=3))
        deadline = time.monotonic() + 5  # the last ACK is on its way through the proxy
        while router.owed and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proxy.close()
        router.close()
    assert proxy.cuts == 1, "the link was never cut: the test proved nothing"
    assert Counter(r.id for r in results) == Counter(i["id"] for i in items), "lost or doubled"
    assert all(r.text == f"answer to p{r.id[1:]}" for r in results)
    assert any(a.get("resend") for a in router.acks), "the client never asked for the lost ones"
    assert router.owed == {}, "results left unacknowledged at the end"
    assert len(router.acks) * (ACK_EVERY // 4) < router.results_messages, (
        f"{len(router.acks)} ACKs for {router.results_messages} RESULTS messages: not batched"
    )


def test_a_real_daemon_behind_a_link_that_resets_mid_stream(daemon_factory):
    port = free_port()
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", listen=f"tcp://127.0.0.1:{port}"
    )  # fmt: skip
    proxy = Proxy(("127.0.0.1", port), cut_after=200_000)
    items = [{"id": f"r{k}", "prompt": f"prompt {k}"} for k in range(5000)]
    try:
        with Client(proxy.address, timeout=30, name="behind the proxy") as client:
            results = list(client.iter_results(items, max_new_tokens=8))
        status = acknowledged(daemon, "behind the proxy")  # the last ACK crosses the proxy
    finally:
        proxy.close()
    assert proxy.cuts == 1, "the link was never cut: the test proved nothing"
    assert Counter(r.id for r in results) == Counter(i["id"] for i in items), "lost or doubled"
    assert all(r.ok and r.completion_tokens == 8 for r in results)
    assert status["queued"] == 0 and status["inflight"] == 0


def acknowledged(daemon: Any, name: str, within: float = 5.0) -> dict[str, Any]:
    """The status once the named client holds no unread results (fails past ``within``)."""
    deadline = time.monotonic() + within
    while True:
        status = daemon.status()
        mine = [c for c in status["clients"] if c["name"] == name]
        if not mine or mine[0]["unread"] == 0:  # gone: the router forgets a client it owes nothing
            return status
        assert time.monotonic() < deadline, f"results left unacknowledged: {mine}"
        time.sleep(0.05)
