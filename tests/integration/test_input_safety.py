"""Malformed input and floods. Garbage is dropped, a well-formed but invalid
request is answered naming the field, nobody else loses work, the router's memory
stays bounded, and a one-line request still gets through."""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from exgen.client import protocol as P
from tests.conftest import wait_for
from tests.netutil import raw_dealer

pytestmark = pytest.mark.timeout(120)

MiB = 2**20


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


# --- the fuzzer ----------------------------------------------------------------------

JUNK: list[Any] = [None, True, -1, 2**64 - 1, 1.5, float("nan"), "", "x" * 300, b"\x00", [], {}]


def junk(rng: random.Random) -> Any:
    value = rng.choice(JUNK)
    return value if rng.random() < 0.8 else [value, {"k": value}]


def fuzz_message(rng: random.Random, n: int) -> tuple[list[bytes], str | None]:
    """One message; the req it must be answered under, or None for garbage."""
    req = f"f{n}"
    kind = n % 6 if n % 100 else 6  # the big ones (limits) one time in a hundred
    if kind == 0:  # random bytes in random frames
        return [rng.randbytes(rng.randint(0, 80)) for _ in range(rng.randint(1, 4))], None
    if kind == 1:  # another protocol version
        version = rng.choice([0, 2, 9, 255])
        return [P.MAGIC + bytes([version]), P.SUBMIT, msgpack.packb({"req": req})], None
    if kind == 2:  # a valid message cut short
        frames = P.pack(P.SUBMIT, {"req": req, "items": [{"id": "a", "prompt": "x" * 50}]})
        return [frames[0], frames[1], frames[2][: rng.randint(0, len(frames[2]) - 1)]], None
    if kind == 3:  # a wrong-typed envelope field
        body: dict[str, Any] = {"req": req, "items": [{"id": "a", "prompt": "x"}]}
        body[rng.choice(["items", "stream"])] = junk(rng)
        return P.pack(P.SUBMIT, body), req
    if kind == 4:  # a wrong-typed or out-of-range item field
        name = rng.choice(["prompt", "messages", "params", "colour"])
        item = {"id": "a", "prompt": "x", name: junk(rng)}
        if name == "params":
            item["params"] = {rng.choice(sorted(P.PARAM_NAMES)): junk(rng)}
        return P.pack(P.SUBMIT, {"req": req, "items": [item]}), req
    if kind == 5:  # an unknown command
        command = rng.choice([b"Z", b"\x00", b"r"])
        return [P.MAGIC_VERSION, command, msgpack.packb({"req": req})], req
    # Limits: too many items, a prompt too long.
    big = [{"id": str(i), "prompt": "x"} for i in range(P.MAX_ITEMS_PER_SUBMIT + 1)]
    long_prompt = [{"id": "a", "prompt": "x" * (P.MAX_PROMPT_CHARS + 1)}]
    return P.pack(P.SUBMIT, {"req": req, "items": rng.choice([big, long_prompt])}), req


def answered_reqs(sock: zmq.Socket[Any], replies: dict[str, dict[str, Any]]) -> None:
    while sock.poll(0):
        command, body = P.unpack(sock.recv_multipart())
        req = body.get("req")
        if isinstance(req, str) and command in (P.ERROR, P.RESULTS, P.ACCEPTED):
            replies.setdefault(req, {"command": command, **body})


def named_field(reply: dict[str, Any]) -> str | None:
    """The field an answer names; "-" for a submit that turned out valid (accepted)."""
    if reply["command"] == P.ACCEPTED:
        return "-"
    if reply["command"] == P.ERROR:
        return reply.get("field") or ("command" if "unknown command" in reply["message"] else None)
    errors = [r["error"] for r in reply["results"] if r.get("error")]
    return errors[0].get("field") if errors else None


def fuzz(sock: zmq.Socket[Any], count: int, seed: int) -> tuple[set[str], dict[str, Any]]:
    rng = random.Random(seed)
    expected: set[str] = set()
    replies: dict[str, dict[str, Any]] = {}
    for n in range(count):
        frames, req = fuzz_message(rng, n)
        sock.send_multipart(frames)
        if req is not None:
            expected.add(req)
        if n % 200 == 0:
            answered_reqs(sock, replies)
    deadline = time.monotonic() + 20
    while expected - set(replies) and time.monotonic() < deadline:
        sock.poll(100)
        answered_reqs(sock, replies)
    return expected, replies


def test_ten_thousand_malformed_frames(daemon_factory):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=2")
    pid = daemon.proc.pid
    sock = raw_dealer(daemon.address, RCVHWM=0)
    # Warm up with as many: the router's caches and buffers, and the allocator's
    # high-water mark, reach their size (one frame in a hundred is a few MB, and ZMQ
    # may hold RCVHWM frames of a connection unread: after 1,000 frames the mark was
    # still climbing, by 20-55 MiB, depending on how far the router lagged the sender).
    fuzz(sock, 10_000, seed=1)
    before = rss(pid)
    results: list[Any] = []
    # Another client's job runs all the while and must not lose anything.
    other = threading.Thread(target=lambda: results.extend(run_job(daemon, 600)))
    other.start()
    started = time.monotonic()
    expected, replies = fuzz(sock, 10_000, seed=2)
    fuzz_s = time.monotonic() - started
    other.join(60)
    sock.close()
    missing = expected - set(replies)
    assert not missing, f"{len(missing)} invalid requests got no answer, e.g. {sorted(missing)[:5]}"
    unnamed = [r for r in replies.values() if named_field(r) is None]
    assert not unnamed, f"answers that name no field: {unnamed[:3]}"
    assert len(results) == 600 and all(r.ok for r in results)
    grown = rss(pid) - before
    assert grown < 30 * MiB, f"router RSS grew {grown / MiB:.1f} MiB over 10,000 bad frames"
    assert daemon.proc.poll() is None and daemon.status()["workers"]
    assert fuzz_s < 30


def deeply_nested(depth: int) -> bytes:
    """msgpack of a list nested ``depth`` deep (no encoder builds one: it would recurse)."""
    return b"\x91" * depth + b"\xc0"


@pytest.mark.parametrize(
    ("where", "field"),
    [("items", "items[0]"), ("item", "items[0]"), ("params", "items[0].params"), ("x", "x[0]")],
)
def test_a_frame_nested_100000_deep_is_a_bad_request_naming_its_field(daemon_factory, where, field):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "1")
    deep = deeply_nested(100_000)
    enc = msgpack.packb
    item = b"\x81" + enc("id") + enc("a")
    if where == "items":
        body = b"\x82" + enc("req") + enc("r1") + enc("items") + deep
    elif where == "item":
        body = b"\x82" + enc("req") + enc("r1") + enc("items") + b"\x91" + deep
    elif where == "params":
        item = b"\x82" + enc("id") + enc("a") + enc("params") + b"\x81" + enc("stop") + deep
        body = b"\x82" + enc("req") + enc("r1") + enc("items") + b"\x91" + item
    else:  # a field nobody knows
        body = b"\x83" + enc("req") + enc("r1") + enc("x") + deep + enc("items") + b"\x91" + item
    sock = raw_dealer(daemon.address, RCVHWM=0)
    sock.send_multipart([P.MAGIC_VERSION, P.SUBMIT, body])
    assert sock.poll(10_000), "no answer"
    command, reply = P.unpack(sock.recv_multipart())
    sock.close()
    assert (command, reply["code"], reply["req"]) == (P.ERROR, P.E_BAD_REQUEST, "r1"), reply
    assert reply["field"].startswith(field) and "nested more than" in reply["message"], reply
    with daemon.client(timeout=10) as client:
        assert client.generate(["still serving"], max_new_tokens=3)[0].ok


def run_job(daemon: Any, n: int) -> list[Any]:
    items = [{"id": f"ok{i}", "prompt": f"fine {i}"} for i in range(n)]
    with daemon.client(timeout=30) as client:
        return list(client.iter_results(items, max_new_tokens=5))


def test_an_oversized_frame_is_refused_by_zmq_not_read(daemon_factory):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "1")
    before = rss(daemon.proc.pid)
    sock = raw_dealer(daemon.address, RCVHWM=0)
    huge = bytes(P.MAX_MESSAGE_BYTES + 1)
    sock.send_multipart([P.MAGIC_VERSION, P.SUBMIT, huge])
    time.sleep(1.0)
    sock.close()
    del huge
    assert rss(daemon.proc.pid) - before < 32 * MiB, "a 64 MiB frame was buffered"
    with daemon.client(timeout=10) as client:
        assert client.generate(["still serving"], max_new_tokens=3)[0].ok


# --- floods ----------------------------------------------------------------------------


class Flooder(threading.Thread):
    """A raw DEALER that sends a million prompts as fast as it can, ignoring busy."""

    def __init__(self, address: str, total: int = 1_000_000, per_submit: int = 10_000) -> None:
        super().__init__(name="flooder", daemon=True)
        self.address = address
        self.total = total
        self.per_submit = per_submit
        self.accepted = 0
        self.busy_items = 0
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        sock = raw_dealer(self.address, RCVHWM=0)
        ids = itertools.count()
        while self.sent < self.total and not self.halt.is_set():
            items = [
                {"id": str(next(ids)), "prompt": "flood", "params": {"max_new_tokens": 2}}
                for _ in range(self.per_submit)
            ]
            sock.send_multipart(P.pack(P.SUBMIT, {"req": f"r{self.sent}", "items": items}))
            self.sent += len(items)
            self.read(sock)
        self.read(sock, wait_s=1.0)
        sock.close()

    def read(self, sock: zmq.Socket[Any], wait_s: float = 0.0) -> None:
        while sock.poll(wait_s * 1000):
            command, body = P.unpack(sock.recv_multipart())
            if command == P.ACCEPTED:
                self.accepted += body["n"]
            elif command == P.ERROR and body["code"] == P.E_BUSY:
                self.busy_items += len(body["items"])


def test_a_million_prompt_flood_is_bounded_and_a_one_liner_gets_through(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "token_ms=20",
        env={"EXGEN_MAX_QUEUE": "5000"},
    )  # fmt: skip
    pid = daemon.proc.pid
    before = rss(pid)
    flooder = Flooder(daemon.address)
    flooder.start()
    wait_for(lambda: flooder.busy_items > 0, 30, "the queue to fill up")
    started = time.monotonic()
    with daemon.client(timeout=30) as client:
        [result] = client.generate(["just one line"], max_new_tokens=2)
    waited = time.monotonic() - started
    assert result.ok
    assert waited < 5.0, f"the one-line request waited {waited:.1f}s behind the flood"
    flooder.join(90)
    assert flooder.sent == 1_000_000
    # Accepted: what the queue holds (plus its reserve) and what the worker got done.
    done = daemon.status()["completed"]
    assert flooder.accepted <= 5500 + done + 10, "the router took more than its queue holds"
    assert flooder.busy_items >= 900_000
    queued = daemon.status()["queued"]
    assert queued <= 5000
    grown = rss(pid) - before
    assert grown < 64 * MiB, f"router RSS grew {grown / MiB:.0f} MiB under the flood"


def test_the_client_window_bounds_a_million_prompt_iterator(daemon_factory):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "2")
    window = 2000
    pulled = 0

    def million() -> Any:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield {"id": str(i), "prompt": "x"}

    got = 0
    worst = 0
    stop_at = time.monotonic() + 4
    with daemon.client(timeout=30, window=window) as client:
        for _ in client.iter_results(million(), max_new_tokens=1):
            got += 1
            worst = max(worst, pulled - got)
            if time.monotonic() > stop_at:
                break
        status = client.status()
    assert got > 2 * window, "too few results to show anything"
    # At most a window in flight, plus results received but not yet handed over.
    assert worst <= 2 * window, f"{worst} items taken from the iterator and not yet answered"
    assert status["queued"] + status["inflight"] <= window
