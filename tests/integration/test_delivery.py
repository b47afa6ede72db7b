"""The delivery contract on links and clients that fail — every accepted
item ends in exactly one answer the client has, and a client that went away costs
little. Real daemons, real sockets, a TCP proxy that resets, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest

from exgen.client import Client
from exgen.client import protocol as P
from tests.conftest import wait_for
from tests.netutil import free_port, raw_dealer
from tests.proxy import Proxy

pytestmark = pytest.mark.timeout(180)

MiB = 2**20

CLIENT_SCRIPT = """
import sys
from exgen.client import Client
address, n, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
items = ({"id": str(i), "prompt": f"p{i}", "params": {"max_new_tokens": tokens}} for i in range(n))
with Client(address, timeout=120) as client:
    for result in client.iter_results(items):
        print(result.id, "ok" if result.ok else result.error, flush=True)
"""


def items(n: int, prefix: str = "", tokens: int = 8) -> list[dict[str, Any]]:
    params = {"max_new_tokens": tokens}
    return [
        {"id": f"{prefix}{i}", "prompt": f"{prefix} prompt {i}", "params": params}
        for i in range(n)
    ]


def queued_and_running(daemon: Any) -> int:
    status = daemon.status()
    return int(status["queued"]) + int(status["inflight"])


# --- results survive the link ---------------------------------------------------------


def test_results_survive_a_link_that_resets_mid_stream(daemon_factory):
    port = free_port()
    daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=1",
        listen=f"tcp://127.0.0.1:{port}",
    )  # fmt: skip
    proxy = Proxy(("127.0.0.1", port))
    seen: list[str] = []
    try:
        with Client(proxy.address, timeout=60) as client:
            for result in client.iter_results(items(3000), max_new_tokens=4):
                assert result.ok, result.error
                seen.append(result.id)
                if len(seen) in (300, 1200, 2400):
                    proxy.cut()  # every connection reset while results stream
    finally:
        proxy.close()
    assert proxy.cuts == 3
    assert len(seen) == 3000 and len(set(seen)) == 3000, "each result exactly once"


def test_a_burst_of_results_larger_than_the_clients_message_limit_arrives(daemon_factory):
    # 200 results end in the same engine step, ~2.4 MB together; the client takes
    # messages of at most 1 MiB. In one message libzmq would close its connection.
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "capacity=200",
        "--engine-opt", "max_seq_len=10000",
    )  # fmt: skip
    sock = raw_dealer(daemon.address, MAXMSGSIZE=MiB)
    sock.send_multipart(P.pack(P.SUBMIT, {"req": "r", "items": items(200, tokens=2000)}))
    got: dict[str, int] = {}
    largest = 0
    deadline = time.monotonic() + 60
    while len(got) < 200 and time.monotonic() < deadline:
        if not sock.poll(500):
            continue
        frames = sock.recv_multipart()
        largest = max(largest, len(frames[-1]))
        command, body = P.unpack(frames)
        if command == P.RESULTS:
            for result in body["results"]:
                assert result["error"] is None
                got[result["id"]] = got.get(result["id"], 0) + 1
            sock.send_multipart(P.pack(P.ACK, {"session": body["session"], "seq": body["seq"]}))
    sock.close()
    assert len(got) == 200 and set(got.values()) == {1}
    assert largest <= MiB


def test_a_result_too_large_for_the_wire_fails_alone(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "max_seq_len=100000",
        env={"EXGEN_MAX_RESULT_BYTES": "65536"},
    )  # fmt: skip
    huge = {"id": "huge", "prompt": "x", "params": {"max_new_tokens": 30000}}
    job = [*items(20, tokens=50), huge]
    with daemon.client(timeout=60) as client:
        results = {r.id: r for r in client.iter_results(job)}
    assert len(results) == 21
    assert all(results[str(i)].ok for i in range(20))
    error = results["huge"].error
    assert error is not None and error.code == P.E_TOO_LARGE
    assert "max_result_bytes" in error.message


# --- a frame cheap to send and costly to decode ---------------------------------------------


def test_decode_bombs_cost_their_sender_only(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=5",
        "--heartbeat-timeout", "3",
    )  # fmt: skip
    bombs = [
        msgpack.packb({"req": "b-prompt", "items": [{"id": "a", "prompt": [0] * 15_000_000}]}),
        msgpack.packb({"req": "b-items", "items": [0] * 15_000_000}),
        msgpack.packb({"req": "b-nested", "items": [{"id": "a", "messages": [[0] * 3000] * 5000}]}),
        msgpack.packb({"req": "b-req", "items": [], "stream": [[0] * 1000] * 15_000}),
    ]
    victim: list[Any] = []

    def run_victim() -> None:
        with daemon.client(timeout=60) as client:
            victim.extend(client.iter_results(items(400)))

    thread = threading.Thread(target=run_victim)
    thread.start()
    sock = raw_dealer(daemon.address)
    answered: dict[str, float] = {}
    started = time.monotonic()
    for _ in range(3):
        for bomb in bombs:
            sock.send_multipart([P.MAGIC_VERSION, P.SUBMIT, bomb])
    refusals = 0  # bad envelopes (ERROR) and bad items (per-item RESULTS)
    while refusals < 3 * len(bombs) and time.monotonic() - started < 30:
        if not sock.poll(200):
            continue
        command, body = P.unpack(sock.recv_multipart())
        if command == P.ERROR:
            assert body["code"] == P.E_BAD_REQUEST and body.get("field")
            answered.setdefault(body["req"], time.monotonic() - started)
            refusals += 1
        elif command == P.ACCEPTED:
            assert body["n"] == 0
            answered.setdefault(body["req"], time.monotonic() - started)
        elif command == P.RESULTS:
            for result in body["results"]:
                assert result["error"]["code"] == P.E_BAD_REQUEST and result["error"]["field"]
                refusals += 1
    bombs_s = time.monotonic() - started
    sock.close()
    thread.join(60)
    assert set(answered) == {"b-prompt", "b-items", "b-nested", "b-req"}
    assert bombs_s < 5, f"12 bombs took {bombs_s:.1f}s to refuse"
    assert len(victim) == 400 and all(r.ok for r in victim), "the victim lost nothing"
    status = daemon.status()
    assert all(w["restarts"] == 0 for w in status["workers"]), "no worker was killed"
    assert "stalled" not in daemon.log_text()


# --- clients that go away ----------------------------------------------------------


def start_client(address: str, n: int, tokens: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, address, str(n), str(tokens)],
        stdout=subprocess.PIPE,
        text=True,
    )


def read_lines(proc: subprocess.Popen[str], count: int) -> list[str]:
    assert proc.stdout is not None
    return [proc.stdout.readline() for _ in range(count)]


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_client_that_dies_has_its_work_cancelled_within_seconds(daemon_factory, how):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "capacity=4",
        "--engine-opt", "token_ms=20",
    )  # fmt: skip
    with start_client(daemon.address, 2000, 10) as client:
        read_lines(client, 30)
        client.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
        client.wait(10)
    completed_at_death = daemon.status()["completed"]
    took = wait_for(lambda: queued_and_running(daemon) == 0, 15, "its work cancelled")
    assert took < 10
    wasted = daemon.status()["completed"] - completed_at_death
    # What was on board (2 workers x (capacity 4 + prefetch)) may finish; nothing new starts.
    assert wasted <= 2 * (4 + 4), f"{wasted} items ran for a client that was gone"
    assert daemon.status()["clients"] == [] or all(
        c["queued"] == 0 and c["running"] == 0 for c in daemon.status()["clients"]
    )


def test_a_stopped_client_loses_its_work_and_gets_it_back_when_it_continues(daemon_factory):
    # Items of 0.5 s: a stopped client (on the default ipc address) is found within a
    # few short heartbeats, before its workers finish much more than what was on board.
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "capacity=4",
        "--engine-opt", "token_ms=50",
    )  # fmt: skip
    with start_client(daemon.address, 120, 10) as client:
        first = read_lines(client, 10)
        client.send_signal(signal.SIGSTOP)
        completed_at_stop = daemon.status()["completed"]
        try:
            took = wait_for(lambda: queued_and_running(daemon) == 0, 20, "its work cancelled")
            assert took < 15
            wasted = daemon.status()["completed"] - completed_at_stop
        finally:
            client.send_signal(signal.SIGCONT)
        assert client.stdout is not None
        rest = client.stdout.read()  # the pipe's own buffer too (communicate() would skip it)
        assert client.wait(120) == 0
    # What was on board (2 workers x (capacity 4 + prefetch 2)) at most ran for nobody.
    assert wasted <= 2 * (4 + 2), f"{wasted} items ran for a client that was stopped"
    ids = [line.split()[0] for line in first + rest.splitlines() if line.strip()]
    assert sorted(ids, key=int) == [str(i) for i in range(120)], "every result exactly once"


def test_a_client_that_stops_reading_stalls_only_itself(daemon_factory):
    # A socket that stops reading also stops answering ZMTP heartbeats (its ZMQ reads
    # nothing past RCVHWM), so after 3 beats it looks like a stopped process and its
    # lease runs out. Beats longer than this test keep its connection: what is tested
    # is the full pipe and the unread budget (the library's own socket reads all it
    # gets, answers every beat, and is held back by the budget instead).
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "capacity=16",
        env={"EXGEN_UNREAD_BUDGET_BYTES": str(2 * MiB), "EXGEN_IPC_HEARTBEAT_S": "30"},
    )  # fmt: skip
    pid = daemon.proc.pid
    before = psutil.Process(pid).memory_info().rss
    # Never reads: a tiny receive buffer fills, then the router's pipe, then its budget.
    sock = raw_dealer(daemon.address, RCVHWM=1, RCVBUF=4096)
    for n in range(20):
        big = items(500, f"{n}-", tokens=400)
        sock.send_multipart(P.pack(P.SUBMIT, {"req": f"r{n}", "items": big}))
    time.sleep(5)
    with daemon.client(timeout=30) as other:
        results = list(other.iter_results(items(300)))
    assert len(results) == 300 and all(r.ok for r in results)
    status = daemon.status()
    stalled = [c for c in status["clients"] if c["queued"] > 0]
    assert stalled and stalled[0]["paused"], "the reader that stopped waits, unread"
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 64 * MiB, f"router grew {grown / MiB:.0f} MiB for a client that stopped reading"
    sock.close()


# --- memory bounded in bytes ------------------------------------------------------------


def test_the_waiting_queue_has_a_byte_budget(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "token_ms=50",
        "--engine-opt", "max_seq_len=1000000",
        env={"EXGEN_MAX_QUEUE_BYTES": str(32 * MiB)},
    )  # fmt: skip
    pid = daemon.proc.pid
    before = psutil.Process(pid).memory_info().rss
    sock = raw_dealer(daemon.address)
    prompt = "y " * 250_000  # 500 kB
    replies: dict[bytes, int] = {}
    for n in range(120):  # 60 MB offered
        body = {"req": f"r{n}", "items": [{"id": str(n), "prompt": prompt}]}
        sock.send_multipart(P.pack(P.SUBMIT, body))
    deadline = time.monotonic() + 30
    while sum(replies.values()) < 120 and time.monotonic() < deadline:
        if sock.poll(200):
            command, body = P.unpack(sock.recv_multipart())
            if command in (P.ACCEPTED, P.ERROR):
                replies[command] = replies.get(command, 0) + 1
                if command == P.ERROR:
                    assert body["code"] == P.E_BUSY and "MiB" in body["message"]
    sock.close()
    assert replies.get(P.ERROR, 0) > 40, "past the byte budget: busy"
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 120 * MiB


# --- deadlines, priorities, model names ------------------------------------------------


def test_an_item_past_its_deadline_is_answered_timeout(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "capacity=1",
        "--engine-opt", "token_ms=50",
    )  # fmt: skip
    job = [
        {"id": "slow", "prompt": "a", "params": {"max_new_tokens": 100}, "timeout_s": 1.0},
        {"id": "waits", "prompt": "b", "params": {"max_new_tokens": 5}, "timeout_s": 0.5},
        {"id": "fine", "prompt": "c", "params": {"max_new_tokens": 5}},
    ]
    started = time.monotonic()
    with daemon.client(timeout=30) as client:
        results = {r.id: r for r in client.iter_results(job)}
    assert time.monotonic() - started < 5, "the 5 s generation was stopped at its deadline"
    slow, waits = results["slow"].error, results["waits"].error
    assert slow is not None and slow.code == P.E_TIMEOUT and "ran" in slow.message
    assert waits is not None and waits.code == P.E_TIMEOUT and "waited" in waits.message
    assert results["fine"].ok
    assert daemon.status()["inflight"] == 0


def test_interactive_items_go_before_a_batch(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "capacity=2",
        "--engine-opt", "token_ms=5",
    )  # fmt: skip
    sock = raw_dealer(daemon.address)
    batch = items(400, "batch-", tokens=10)
    sock.send_multipart(P.pack(P.SUBMIT, {"req": "b", "items": batch, "priority": "batch"}))
    time.sleep(0.5)
    started = time.monotonic()
    with daemon.client(timeout=30) as client:
        [result] = client.generate(["a chat request"], max_new_tokens=10)
    latency = time.monotonic() - started
    assert result.ok
    # Behind 400 waiting batch items it would take 400 / 2 x 50 ms = 10 s.
    assert latency < 2.0, f"the interactive request waited {latency:.1f}s behind the batch"
    sock.close()


def test_strict_model_names_refuse_another_model_per_item(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", env={"EXGEN_STRICT_MODEL": "true"}
    )
    job = [
        {"id": "named", "prompt": "a", "model": "synthetic"},
        {"id": "other", "prompt": "b", "model": "gpt-4o"},
        {"id": "unnamed", "prompt": "c"},
    ]
    with daemon.client(timeout=30) as client:
        results = {r.id: r for r in client.iter_results(job, max_new_tokens=3)}
    assert results["named"].ok and results["unnamed"].ok
    other = results["other"].error
    assert other is not None and other.code == P.E_MODEL_NOT_FOUND
    assert "'synthetic'" in other.message and "'gpt-4o'" in other.message


# --- jobs you can see and cancel ---------------------------------------------------------


def test_status_shows_each_client_and_another_client_can_cancel_its_work(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "capacity=2",
        "--engine-opt", "token_ms=20",
    )  # fmt: skip
    sock = raw_dealer(daemon.address)
    hello = {"req": "h", "name": "nightly labels", "host": "box", "pid": 4242}
    sock.send_multipart(P.pack(P.HELLO, hello))
    sock.send_multipart(P.pack(P.SUBMIT, {"req": "s", "items": items(300, tokens=20)}))
    wait_for(lambda: any(c["name"] == "nightly labels" for c in daemon.status()["clients"]), 10, "")
    [mine] = [c for c in daemon.status()["clients"] if c["name"] == "nightly labels"]
    assert mine["pid"] == 4242 and mine["host"] == "box" and mine["queued"] > 0
    other = raw_dealer(daemon.address)
    other.send_multipart(P.pack(P.CANCEL, {"req": "c", "client": "nightly labels"}))
    assert other.poll(5000)
    command, body = P.unpack(other.recv_multipart())
    assert command == P.CANCELLED and body["cancelled"] > 250
    wait_for(lambda: queued_and_running(daemon) == 0, 10, "its work cancelled")
    cancelled = 0
    deadline = time.monotonic() + 10
    while cancelled < body["cancelled"] and time.monotonic() < deadline:
        if sock.poll(200):
            command, reply = P.unpack(sock.recv_multipart())
            if command == P.RESULTS:
                errors = [r["error"] for r in reply["results"] if r["error"]]
                cancelled += sum(1 for e in errors if e["code"] == P.E_CANCELLED)
    assert cancelled == body["cancelled"], "each cancelled item was answered to its client"
    sock.close()
    other.close()


# --- clear refusals ---------------------------------------------------------------------


def test_a_busy_tcp_address_is_one_line_and_exit_2(daemon_factory, tmp_path: Path):
    port = free_port()
    daemon_factory("--engine", "synthetic", "--workers", "1", listen=f"tcp://127.0.0.1:{port}")
    second = subprocess.run(
        [sys.executable, "-m", "exgen.daemon.cli", "serve", "--engine", "synthetic",
         "--listen", f"tcp://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines
