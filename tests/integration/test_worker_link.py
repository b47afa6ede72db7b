"""The Ray-mode backend without Ray: a TCP + CURVE socket whose allow-list holds one
key per worker start, and the actor's body (ray_host.WorkerHost) starting the real
worker process, which connects back with the keys it read on stdin."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from exgen.client import protocol as P
from exgen.daemon.net import wire, workerlink
from exgen.daemon.supervisor.ray_host import WorkerHost
from exgen.daemon.worker import WorkerSpec

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def backend() -> Any:
    link = workerlink.bind_tcp("tcp://127.0.0.1:0")
    yield link
    link.close()


def dealer(ctx: zmq.Context[Any], link: workerlink.Backend, keys: tuple[str, str]) -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    assert link.keys is not None
    sock.curve_serverkey = link.keys.public.encode()
    sock.curve_publickey, sock.curve_secretkey = (k.encode() for k in keys)
    sock.connect(link.address)
    return sock


def received(link: workerlink.Backend, timeout_ms: int = 10_000) -> list[bytes] | None:
    if link.socket.poll(timeout_ms):
        return list(link.socket.recv_multipart())
    return None


def test_only_keys_on_the_allow_list_get_through_and_a_revoked_one_is_refused(backend):
    assert backend.keys is not None
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        allowed = backend.keys.issue()
        stranger = tuple(k.decode() for k in zmq.curve_keypair())
        ok = dealer(ctx, backend, allowed)
        ok.send(b"hello")
        frames = received(backend)
        assert frames is not None and frames[-1] == b"hello", "an allowed key is heard"
        bad = dealer(ctx, backend, stranger)  # type: ignore[arg-type]
        bad.send(b"let me in")
        assert received(backend, 800) is None, "a key not on the allow-list is not heard"
        backend.keys.revoke(allowed[0])
        again = dealer(ctx, backend, allowed)
        again.send(b"again")
        assert received(backend, 800) is None, "a revoked key cannot connect again"
    finally:
        # destroy, not term: after a failed assert a socket is still open, and term
        # would wait for it for ever (past pytest's timeout: it blocks in C).
        ctx.destroy(linger=0)


def test_advertised_address_names_this_machine_when_bound_to_all():
    assert workerlink.advertised("tcp://0.0.0.0:5556", "10.1.2.3") == "tcp://10.1.2.3:5556"
    assert workerlink.advertised("tcp://127.0.0.1:41000", "10.1.2.3") == "tcp://127.0.0.1:41000"
    assert workerlink.advertised("tcp://[::]:5556", "fd00::1") == "tcp://[fd00::1]:5556"


def test_the_actor_body_starts_the_real_worker_which_connects_back_with_curve(
    backend, tmp_path: Path
):
    assert backend.keys is not None
    keys = backend.keys.issue()
    spec = WorkerSpec(
        slot=3,
        backend=backend.address,
        engine="synthetic",
        model=None,
        engine_opts={},
        heartbeat_interval_s=0.2,
        devices=None,
        curve_server_key=backend.keys.public,
    )
    host = WorkerHost(spec.to_json(), {"PYTHONUNBUFFERED": "1"}, keys, node="f00d" * 14)
    try:
        facts = host.facts()
        assert facts["pid"] == host.popen.pid and facts["node"] == "f00d" * 14
        cmdline = Path(f"/proc/{facts['pid']}/cmdline").read_bytes()
        assert keys[1].encode() not in cmdline and keys[0].encode() not in cmdline, (
            "the worker's keys travel on stdin, never on its command line"
        )
        ready = wait_for_ready(backend)
        identity, body = ready
        assert identity == f"w3-{'f00d' * 3}-{facts['pid']}".encode(), "identity carries node"
        assert body.slot == 3 and body.pid == facts["pid"]
        host.signal(signal.SIGKILL)
        returncode, oom_kill_seen = host.wait()
        assert returncode == -signal.SIGKILL and oom_kill_seen in (False, None)
    finally:
        if host.popen.poll() is None:
            os.kill(host.popen.pid, signal.SIGKILL)
            host.popen.wait()


def wait_for_ready(link: workerlink.Backend, timeout: float = 30.0) -> tuple[bytes, wire.Ready]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frames = received(link, 500)
        if frames is None:
            continue
        command, body = P.unpack(frames[1:])
        if command == wire.READY:
            return frames[0], wire.decode_ready(body)
    raise AssertionError("no READY from the worker over TCP + CURVE")


def test_a_worker_with_a_key_not_allowed_never_says_ready(backend):
    assert backend.keys is not None
    stranger = tuple(k.decode() for k in zmq.curve_keypair())
    spec = WorkerSpec(3, backend.address, "synthetic", None, {}, 0.2, None)
    spec.curve_server_key = backend.keys.public
    host = WorkerHost(spec.to_json(), {}, stranger, node="beef")  # type: ignore[arg-type]
    try:
        assert received(backend, 3000) is None
    finally:
        host.signal(signal.SIGKILL)
        host.wait()
    assert json.loads(spec.to_json())["curve_server_key"] == backend.keys.public
