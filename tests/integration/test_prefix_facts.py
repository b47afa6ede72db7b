"""A real worker process reports what its prefix cache did: per result, the prompt
tokens it found cached (DONE); per worker, its running counters (heartbeats).

The test plays the router: a ROUTER socket the worker connects to, WORK sent, DONE
and heartbeats read, SIGTERM at the end (as the supervisor stops it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from exgen.client import protocol as P
from exgen.daemon.net import wire
from exgen.daemon.worker import WorkerSpec

FEW_SHOT = " ".join(f"example {i} says {i * 7}." for i in range(20))  # 80 words


def start_worker(backend: str, **engine_opts: str) -> subprocess.Popen[bytes]:
    spec = WorkerSpec(
        slot=0,
        backend=backend,
        engine="synthetic",
        model=None,
        engine_opts=engine_opts,
        heartbeat_interval_s=0.05,
        devices=None,
    )
    return subprocess.Popen([sys.executable, "-m", "exgen.daemon.worker", spec.to_json()])


def receive(sock: zmq.Socket[Any], command: bytes, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            got, body = P.unpack(frames[1:])
            if got == command:
                return body
    raise AssertionError(f"no {command!r} from the worker in {timeout_s}s")


def test_done_carries_cached_tokens_and_heartbeats_carry_counters(tmp_path: Path) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    backend = f"ipc://{tmp_path}/backend.sock"
    sock.bind(backend)
    worker = start_worker(backend, prefix_cache_tokens="1000", prefill_token_ms="0.01")
    try:
        ready = receive(sock, wire.READY)
        identity = f"w0-{worker.pid}".encode()
        assert ready["pid"] == worker.pid
        params = {"max_new_tokens": 2}
        jobs = [[1, FEW_SHOT + " first", None, params, False]]
        jobs.append([2, FEW_SHOT + " second one", None, params, False])
        sock.send_multipart([identity, *P.pack(wire.WORK, {"jobs": jobs})])
        finished: dict[int, Any] = {}
        while len(finished) < 2:
            done, _ = wire.decode_done(receive(sock, wire.DONE))
            finished.update({e.key: e for e in done})
        assert finished[1].cached_tokens == 0 and finished[2].cached_tokens == 80
        deadline = time.monotonic() + 30
        beat = wire.decode_heartbeat(receive(sock, wire.HEARTBEAT))
        while beat.counters.get("prefix_hits") != 1 and time.monotonic() < deadline:
            beat = wire.decode_heartbeat(receive(sock, wire.HEARTBEAT))
        assert beat.counters["prefix_hits"] == 1
        assert beat.counters["prefill_tokens_saved"] == 80
        assert beat.counters["prefill_tokens"] == 81 + 2
        worker.terminate()
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, 9)
            worker.wait()
        sock.close(linger=0)
        ctx.term()


def test_done_rows_carry_cached_tokens_only_when_there_are_some() -> None:
    from exgen.daemon.engines.base import Finished

    plain = Finished(1, "a", P.FINISH_LENGTH, 5, 1)
    hit = Finished(2, "b", P.FINISH_LENGTH, 90, 1, cached_tokens=80)
    frames = wire.pack_done([plain, hit], [])
    body = P.unpack(frames)[1]
    assert body["done"][0][5] is None  # a plain result costs nothing more on the wire
    assert body["done"][1][5] == {"cached_tokens": 80}
    assert wire.decode_done(body)[0] == [plain, hit]
