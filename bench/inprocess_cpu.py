"""CPU per prompt of the client library and of the worker loop, in-process, no sockets.

End to end on a shared 2-core machine the rates swing by ±30 % from round to round;
the CPU a piece of code spends per prompt, measured alone in one process, swings by
a few percent. Two harnesses, each the code of whichever ``exgen`` is importable (so
``compare.py`` can run them against an older revision):

- **client**: ``Client.iter_results`` over ``--prompts`` one-token items, its socket
  and poller replaced by a fake daemon that answers each submit with ACCEPTED and
  hands out RESULTS of ``--results-per-message`` results, one message per wait (as a
  daemon's results trickle in). The fake daemon's own CPU is subtracted.
- **worker**: the worker's receive / step / send loop (``Worker.receive_all``, the
  synthetic zero-cost engine's ``step``, ``Worker.send_events``) over WORK messages of
  ``--jobs-per-message`` rows, through a fake socket; the WORK frames are built first.

The cyclic GC runs as it does in each process (the worker tunes it with
``daemon/gcpolicy.py`` where the revision has it); its time is reported too.

    .venv/bin/python bench/compare.py --baseline 2f51035 --rounds 9 inprocess_cpu.py
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import zmq
from benchlib import emit, machine, median

from exgen.client import Client
from exgen.client import protocol as P

SESSION = 12345
INSTANCE = "inprocess-1"


class GcClock:
    """Seconds the cyclic GC spent while installed."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._started = 0.0

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.spent += time.process_time() - self._started


# --- the client ----------------------------------------------------------------------


class FakeDaemon:
    """The client's socket: answers as the daemon does, counts its own CPU."""

    def __init__(self, per_message: int) -> None:
        self.per_message = per_message
        self.inbox: deque[list[bytes]] = deque()
        self.pending: deque[str] = deque()  # ids of results not yet handed out
        self.numbered = hasattr(P, "ACK")  # a daemon of the delivery contract
        self.seq = 0
        self.served = False
        self.cpu = 0.0

    def connect(self, address: str) -> None:
        pass

    def close(self, linger: int | None = None) -> None:
        pass

    def disable_monitor(self) -> None:
        pass

    def poll(self, timeout: float | None = None, flags: int = zmq.POLLIN) -> int:
        if timeout:
            self.served = False  # a real wait: the next message may have come
        elif self.served:
            return 0  # one RESULTS message per wait, as results trickle in
        return zmq.POLLIN if self.inbox or self.pending else 0

    def recv_multipart(self) -> list[bytes]:
        if not self.inbox:
            started = time.process_time()
            self._results()
            self.served = True
            self.cpu += time.process_time() - started
        return self.inbox.popleft()

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        started = time.process_time()
        command, body = P.unpack(frames)
        req = body.get("req")
        if command == P.SUBMIT:
            self._reply(
                P.ACCEPTED,
                {"req": req, "n": len(body["items"]), "queued": 0, "instance": INSTANCE,
                 "session": SESSION, "model": "synthetic"},
            )  # fmt: skip
            self.pending.extend(item["id"] for item in body["items"])
        elif command == P.PING:
            self._reply(
                P.PONG,
                {"req": req, "instance": INSTANCE, "session": SESSION, "known": True,
                 "seq": self.seq, "acked": self.seq},
            )  # fmt: skip
        elif command == getattr(P, "HELLO", None):
            self._reply(
                P.WELCOME,
                {"req": req, "instance": INSTANCE, "session": SESSION, "model": "synthetic"},
            )
        self.cpu += time.process_time() - started

    def _reply(self, command: bytes, body: dict[str, Any]) -> None:
        self.inbox.append(P.pack(command, body))

    def _results(self) -> None:
        take = self.pending.popleft
        results = [
            {"id": take(), "text": " over", "finish_reason": "length", "prompt_tokens": 1,
             "completion_tokens": 1, "slot": i % 4, "error": None}
            for i in range(min(self.per_message, len(self.pending)))
        ]  # fmt: skip
        body: dict[str, Any] = {"results": results}
        if self.numbered:
            self.seq += 1
            body = {"session": SESSION, "seq": self.seq, "results": results}
        self._reply(P.RESULTS, body)


class FakePoller:
    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon

    def poll(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        return [(self.daemon, zmq.POLLIN)] if self.daemon.poll(timeout or 1) else []


def fake_client(daemon: FakeDaemon, window: int) -> Client:
    client = Client("tcp://127.0.0.1:1", timeout=60, window=window)
    real: Any = client._sock
    client._sock = daemon  # type: ignore[assignment]
    if hasattr(client, "_poller"):  # the multiplexing client
        real.disable_monitor()
        client._monitor.close(linger=0)
        client._poller = FakePoller(daemon)  # type: ignore[assignment]
        client._monitor = object()  # type: ignore[assignment]
        client._core.handshakes = 1  # as after a real handshake
    real.close(linger=0)
    return client


def client_round(prompts: int, per_message: int, window: int) -> dict[str, float]:
    daemon = FakeDaemon(per_message)
    client = fake_client(daemon, window)
    items = ({"id": str(i), "prompt": f"p{i}"} for i in range(prompts))
    done = 0
    with GcClock() as collector:
        started = time.process_time()
        for result in client.iter_results(items, max_new_tokens=1):
            done += result.ok
        spent = time.process_time() - started
    if done != prompts:
        raise RuntimeError(f"{prompts - done} prompts failed")
    return {
        "cpu_us": (spent - daemon.cpu) * 1e6 / prompts,
        "gc_us": collector.spent * 1e6 / prompts,
    }


# --- the worker ----------------------------------------------------------------------


class FakeRouter:
    """The worker's DEALER: WORK frames to read, DONE frames counted."""

    def __init__(self) -> None:
        self.inbox: list[list[bytes]] = []
        self.sent = 0

    def getsockopt(self, option: int) -> int:
        return zmq.POLLIN if self.inbox else 0

    def recv_multipart(self) -> list[bytes]:
        return self.inbox.pop()

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sent += 1


def work_messages(prompts: int, per_message: int) -> Iterator[list[bytes]]:
    try:
        from exgen.daemon.net import wire

        command = wire.WORK
    except ImportError:  # before the router <-> worker wire had a module of its own
        command = P.WORK  # type: ignore[attr-defined]
    params = {"max_new_tokens": 1}
    for start in range(0, prompts, per_message):
        rows = [[k, f"p{k}", None, params, False] for k in range(start, start + per_message)]
        yield P.pack(command, {"jobs": rows})


def worker_round(prompts: int, per_message: int, capacity: int) -> dict[str, float]:
    import exgen.daemon.worker as W
    from exgen.daemon.engines.synthetic import SyntheticEngine

    engine = SyntheticEngine(None, {"capacity": str(capacity), "token_ms": "0", "batch_ms": "0"})
    engine.load()
    worker = object.__new__(W.Worker)
    router = FakeRouter()
    worker.sock = router  # type: ignore[assignment]
    worker.progress = W.Progress()
    worker.engine = engine
    messages = list(work_messages(prompts, per_message))
    with GcClock() as collector:
        started = time.process_time()
        for message in messages:  # the loop of Worker.run, one WORK message a turn
            router.inbox.append(message)
            worker.receive_all(engine)
            while engine.pending:
                events = engine.step()
                worker.progress.steps += 1
                worker.progress.pending = engine.pending
                if events:
                    worker.send_events(events)
        spent = time.process_time() - started
    return {"cpu_us": spent * 1e6 / prompts, "gc_us": collector.spent * 1e6 / prompts}


def tune_gc_as_workers_do() -> dict[str, Any]:
    saved = gc.get_threshold()
    try:
        from exgen.daemon import gcpolicy
    except ImportError:  # a revision before it: the default collector
        return {"threshold": saved}
    gcpolicy.tune()
    return {"threshold": saved, "frozen": True}


def run(args: argparse.Namespace) -> dict[str, Any]:
    client_round(min(args.prompts, 20_000), args.results_per_message, args.window)  # warm up
    client = [client_round(args.prompts, args.results_per_message, args.window)
              for _ in range(args.repeat)]  # fmt: skip
    restore = tune_gc_as_workers_do()
    worker = [worker_round(args.prompts, args.jobs_per_message, args.capacity)
              for _ in range(args.repeat)]  # fmt: skip
    gc.unfreeze()
    gc.set_threshold(*restore["threshold"])
    return {
        "bench": "inprocess_cpu",
        "prompts": args.prompts,
        "repeat": args.repeat,
        "client_cpu_us_per_prompt": round(median([r["cpu_us"] for r in client]), 3),
        "client_gc_us_per_prompt": round(median([r["gc_us"] for r in client]), 3),
        "worker_cpu_us_per_prompt": round(median([r["cpu_us"] for r in worker]), 3),
        "worker_gc_us_per_prompt": round(median([r["gc_us"] for r in worker]), 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many passes")
    parser.add_argument("--window", type=int, default=8192, help="as router_capacity.py")
    parser.add_argument("--results-per-message", type=int, default=128)
    parser.add_argument("--jobs-per-message", type=int, default=32)
    parser.add_argument("--capacity", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    doc = {"machine": machine(), **run(parse_args(argv))}
    emit(doc)
    return doc


if __name__ == "__main__":
    main()
