"""The worker process: one per slot, driving one engine.

Started by the supervisor as a fresh interpreter (``python -m exgen.daemon.worker
SPEC``; never forked) with CUDA_VISIBLE_DEVICES already narrowed to its GPUs, so
the engine's library sees only this slot's cards.

Two sockets to the router's backend: the main DEALER (READY, results, work) driven
by the main thread together with the engine, and a heartbeat DEALER owned by a
thread. Heartbeats carry a progress counter bumped by every engine step, so a step
wedged on the GPU stops the counter while the heartbeats go on: the router tells a
hung engine (progress deadline) from a frozen process (missed heartbeats).

If the supervisor disappears, the kernel kills this process (PR_SET_PDEATHSIG) and a
watch thread double-checks the parent: no orphaned GPU processes. (In Ray mode the
parent is the slot's Ray actor on this node, and the worker connects back to the
router over TCP with CURVE: the spec names the router's public key, and the worker's
own key pair arrives on stdin, never on the command line.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from exgen.client import protocol as P
from exgen.daemon import gcpolicy, policy
from exgen.daemon.engines import engine_class
from exgen.daemon.engines.base import (
    Chunk,
    Engine,
    EngineUnavailable,
    Event,
    Failed,
    Finished,
    JobRejected,
)
from exgen.daemon.logs import setup_logging
from exgen.daemon.net import wire
from exgen.daemon.net.sockets import readable
from exgen.daemon.procs import die_with_parent

logger = logging.getLogger("exgen.worker")


@dataclass(slots=True)
class WorkerSpec:
    slot: int
    backend: str
    engine: str
    model: str | None
    engine_opts: dict[str, str]
    heartbeat_interval_s: float
    devices: list[int] | None
    log_level: str = "info"
    node: str = ""  # the machine's id in a cluster (Ray mode); part of the identity
    curve_server_key: str | None = None  # the router's public key: read ours from stdin

    def to_json(self) -> str:
        return json.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def identity(prefix: str, spec: WorkerSpec, pid: int) -> bytes:
    """A socket identity unique across machines: pids repeat from node to node."""
    node = f"{spec.node[:12]}-" if spec.node else ""
    return f"{prefix}{spec.slot}-{node}{pid}".encode()


def read_curve_keys(spec: WorkerSpec) -> tuple[str, str] | None:
    """Our (public, secret) CURVE keys, from the one JSON line our launcher wrote to
    stdin; None when the router speaks without CURVE."""
    if spec.curve_server_key is None:
        return None
    keys = json.loads(sys.stdin.readline())
    sys.stdin.close()
    return str(keys["public"]), str(keys["secret"])


def secure(sock: zmq.Socket[Any], spec: WorkerSpec, keys: tuple[str, str] | None) -> None:
    if keys is not None and spec.curve_server_key is not None:
        sock.curve_serverkey = spec.curve_server_key.encode()
        sock.curve_publickey, sock.curve_secretkey = keys[0].encode(), keys[1].encode()


class Progress:
    """Counters shared with the heartbeat thread (ints: atomic enough under the GIL)."""

    def __init__(self) -> None:
        self.steps = 0
        self.pending = 0
        self.tokens = 0
        self.state = "loading"
        self.engine: Engine | None = None  # set once loaded; its decode_steps count too


def heartbeat_loop(
    ctx: zmq.Context[Any], spec: WorkerSpec, progress: Progress, keys: tuple[str, str] | None
) -> None:
    """Own socket, own thread: beats go on while the main thread is inside a step."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10)
    sock.setsockopt(zmq.IDENTITY, identity("hb", spec, os.getpid()))
    secure(sock, spec, keys)
    sock.connect(spec.backend)
    pid = os.getpid()
    while True:
        beat = wire.Beat(
            slot=spec.slot,
            pid=pid,
            state=progress.state,
            progress=progress.steps + (progress.engine.decode_steps if progress.engine else 0),
            pending=progress.pending,
            tokens=progress.tokens,
            counters=progress.engine.counters() if progress.engine else {},
        )
        try:
            sock.send_multipart(wire.pack_heartbeat(beat), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the router is not reading; it will notice the silence itself
        time.sleep(spec.heartbeat_interval_s)


REFILL_WAIT_FRACTION = 0.05  # of the last step's duration
REFILL_WAIT_MAX_MS = 50.0


def refill_wait_ms(step_ms: float, finished: bool, pending: int, capacity: int) -> float:
    """How long to wait for the router's refill before the next step.

    Jobs that just finished freed room, and the router refills it as soon as their
    results arrive (a round trip of about a millisecond). Stepping at once would start
    the next batch part-empty: for a static-batching engine (transformers' generate)
    that is a whole batch's time spent on the prefetched leftovers. Waiting at most 5 %
    of a step (the wait ends when the refill arrives) bounds what a continuous engine
    can lose when no refill comes. (zmq's poll counts whole milliseconds: a wait
    under 1 ms is no wait, so millisecond-scale steps are never slowed.)
    """
    if not finished or pending >= capacity:
        return 0.0
    return min(REFILL_WAIT_MAX_MS, step_ms * REFILL_WAIT_FRACTION)


class Worker:
    def __init__(
        self, spec: WorkerSpec, ctx: zmq.Context[Any], keys: tuple[str, str] | None = None
    ) -> None:
        self.spec = spec
        self.pid = os.getpid()
        self.progress = Progress()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.IDENTITY, identity("w", spec, self.pid))
        secure(self.sock, spec, keys)
        self.sock.connect(spec.backend)
        self.engine: Engine | None = None

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def boot(self) -> Engine:
        """Load the engine and say READY; a boot error is reported then fatal."""
        started = time.monotonic()
        logger.info("loading engine %s model %s", self.spec.engine, self.spec.model or "(default)")
        try:
            engine = engine_class(self.spec.engine)(self.spec.model, self.spec.engine_opts)
            engine.load()
        except EngineUnavailable as exc:
            self.fail_boot(str(exc))
        gcpolicy.freeze()  # the engine's libraries and model objects live as long as we do
        load_s = time.monotonic() - started
        ready = wire.Ready(
            slot=self.spec.slot,
            pid=self.pid,
            engine=engine.name,
            capacity=engine.capacity,
            max_seq_len=engine.max_seq_len,
            load_s=round(load_s, 3),
            describe=engine.describe(),
        )
        self.send(wire.pack_ready(ready))
        self.progress.engine = engine
        self.progress.state = "ready"
        logger.info(
            "ready: engine %s capacity %d, loaded in %.2fs", engine.name, engine.capacity, load_s
        )
        return engine

    def fail_boot(self, message: str) -> None:
        logger.error("boot error: %s", message)
        self.send(wire.pack_fatal(wire.Fatal(self.spec.slot, self.pid, "boot", message)))
        self.sock.close(linger=2000)  # let FATAL reach the router before we go
        sys.exit(policy.EXIT_BOOT_ERROR)

    def run(self) -> None:
        engine = self.engine = self.boot()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        wait_ms = 0.0
        while True:
            timeout = int(wait_ms) if engine.pending else 100
            if poller.poll(timeout):
                self.receive_all(engine)
            if engine.pending:
                started = time.monotonic()
                events = engine.step()
                step_ms = (time.monotonic() - started) * 1000
                self.progress.steps += 1
                self.progress.pending = engine.pending
                if events:
                    self.send_events(events)
                finished = any(not isinstance(e, Chunk) for e in events)
                wait_ms = refill_wait_ms(step_ms, finished, engine.pending, engine.capacity)

    def receive_all(self, engine: Engine) -> None:
        """Take every waiting message (the worker stops on SIGTERM, not by message)."""
        while readable(self.sock):
            command, body = P.unpack(self.sock.recv_multipart())
            if command == wire.WORK:
                self.add_jobs(engine, body)
            elif command == wire.CANCEL:
                for key in wire.decode_cancel(body):
                    engine.cancel(key)

    def add_jobs(self, engine: Engine, body: dict[str, Any]) -> None:
        rejected: list[Event] = []
        for job in wire.decode_work(body):
            try:
                engine.add(job)
            except JobRejected as exc:
                rejected.append(Failed(job.key, exc.code, exc.message, exc.field))
        self.progress.pending = engine.pending
        if rejected:
            self.send_events(rejected)

    def send_events(self, events: list[Event]) -> None:
        finished: list[Finished] = []
        failed: list[Failed] = []
        chunks: list[Chunk] = []
        for event in events:
            if isinstance(event, Finished):
                self.progress.tokens += event.completion_tokens
                finished.append(event)
            elif isinstance(event, Failed):
                failed.append(event)
            elif isinstance(event, Chunk):
                chunks.append(event)
        if chunks:
            self.send(wire.pack_chunks(chunks))
        if finished or failed:
            self.send(wire.pack_done(finished, failed))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec.from_json(args[0])
    parent = int(args[1]) if len(args) > 1 else os.getppid()
    die_with_parent(parent)
    node = f" node {spec.node[:12]}" if spec.node else ""
    setup_logging(spec.log_level, prefix=f"slot {spec.slot}{node} pid {os.getpid()}")
    # SIGTERM from the supervisor means "stop now"; SIGINT belongs to the supervisor.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keys = read_curve_keys(spec)
    gcpolicy.tune()
    ctx = zmq.Context()
    worker = Worker(spec, ctx, keys)
    threading.Thread(
        target=heartbeat_loop,
        args=(ctx, spec, worker.progress, keys),
        name="heartbeat",
        daemon=True,
    ).start()
    try:
        worker.run()
    except Exception:
        logger.exception("worker failed")
        os._exit(1)
    worker.sock.close(linger=2000)
    os._exit(policy.EXIT_OK)


if __name__ == "__main__":
    main()
