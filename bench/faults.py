"""The fault matrix: each way a link or a client fails, and what it costs.

For every scenario, on a real daemon (synthetic engine, a GPU-like step time):

- lost: ids the client never got an answer for (within the scenario's time limit)
- duplicated: ids handed to the caller more than once
- failed: innocent items answered with an error
- wasted: items completed for a client that died, in items, batches per worker and
  GPU-seconds (a worker runs ``capacity`` items at once)
- recovery s: from the fault to the job complete (or, for a dead client, to its work
  gone from the daemon)
- peak router RSS MiB: the supervisor/router process, sampled every 50 ms

    .venv/bin/python bench/faults.py                   # every scenario, JSON on stdout
    .venv/bin/python bench/faults.py --only link-reset bombs

Run against another tree (an older commit) with PYTHONPATH pointing at a directory
holding ``exgen/client`` and ``exgen/daemon`` links into it: the scenarios use only
the public client API and raw protocol frames of whatever version is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
from benchlib import Daemon, running_daemon

from exgen.client import Client
from exgen.client import protocol as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.netutil import raw_dealer
from tests.proxy import Proxy

MiB = 2**20
TOKEN_MS = 10  # one decode step: a GPU-like pace, so a batch takes a while
CAPACITY = 8
WORKERS = 2


class Rss:
    """Peak RSS of a process, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return round(self.peak / MiB, 1)


def network_host() -> str:
    """This machine's first IPv4 address other than loopback: a TCP address as a
    client on another machine would reach it (the daemon's long heartbeat)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    raise SystemExit("no network address on this machine for the TCP scenarios")


@contextlib.contextmanager
def daemon(
    *extra: str, env: dict[str, str] | None = None, tcp: bool = False, network: bool = False
) -> Iterator[Daemon]:
    """The synthetic daemon of every scenario; ``extra`` options win over these."""
    opts = {"token_ms": TOKEN_MS, "capacity": CAPACITY, "max_seq_len": 100000}
    # A daemon before protocol 2 knows none of the budgets (and refuses unknown
    # settings): it runs with what it has.
    budgets = env if P.PROTOCOL_VERSION >= 2 else None
    host = network_host() if network else "127.0.0.1"
    with running_daemon(
        WORKERS, "synthetic", opts, *extra, env=budgets, timeout=60, tcp=tcp or network, host=host
    ) as d:
        yield d


def items(n: int, tokens: int = 8, prefix: str = "") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "prompt": f"{prefix} {i}", "params": {"max_new_tokens": tokens}}
        for i in range(n)
    ]


def tally(expected: list[str], got: list[Any]) -> dict[str, Any]:
    ids = [r.id for r in got]
    return {
        "lost": len(set(expected) - set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "failed": sum(1 for r in got if not r.ok),
    }


def run_with_limit(fn: Callable[[], list[Any]], limit_s: float) -> tuple[list[Any], bool]:
    """``fn()``'s results, or what it had when ``limit_s`` ran out (True: it hung)."""
    out: list[Any] = []
    done = threading.Event()

    def body() -> None:
        with contextlib.suppress(Exception):
            out.extend(fn())
        done.set()

    threading.Thread(target=body, daemon=True).start()
    return out, not done.wait(limit_s)


# --- scenarios ---------------------------------------------------------------------------


def link_reset() -> dict[str, Any]:
    """A TCP link reset three times while 5,000 results stream."""
    with daemon(tcp=True) as d:
        port = int(d.address.rsplit(":", 1)[1])
        proxy = Proxy(("127.0.0.1", port))
        rss = Rss(d.proc.pid)
        got: list[Any] = []
        cut_at: list[float] = []

        def job() -> list[Any]:
            with Client(proxy.address, timeout=300) as client:
                for result in client.iter_results(items(5000, tokens=4)):
                    got.append(result)
                    if len(got) in (1000, 2500, 4000):
                        cut_at.append(time.monotonic())
                        proxy.cut()
            return []

        _, hung = run_with_limit(job, 120)
        ended = time.monotonic()
        proxy.close()
        return {
            **tally([str(i) for i in range(5000)], got),
            "wasted_gpu_s": 0.0,
            "recovery_s": round(ended - cut_at[-1], 2) if cut_at and not hung else None,
            "hung": hung,
            "peak_rss_mib": rss.close(),
        }


def burst() -> dict[str, Any]:
    """200 results of ~12 kB ending in one step, to a client taking messages <= 1 MiB."""
    with daemon("--engine-opt", "capacity=200") as d:
        rss = Rss(d.proc.pid)
        sock = raw_dealer(d.address, MAXMSGSIZE=MiB)
        started = time.monotonic()
        sock.send_multipart(P.pack(P.SUBMIT, {"req": "r", "items": items(200, tokens=2000)}))
        seen: list[str] = []
        while len(seen) < 200 and time.monotonic() - started < 60:
            if not sock.poll(500):
                continue
            command, body = P.unpack(sock.recv_multipart())
            if command == P.RESULTS:
                seen.extend(r["id"] for r in body["results"])
                if hasattr(P, "ACK") and "seq" in body:
                    ack = {"session": body.get("session"), "seq": body["seq"]}
                    sock.send_multipart(P.pack(P.ACK, ack))
        sock.close()
        return {
            "lost": 200 - len(set(seen)),
            "duplicated": len(seen) - len(set(seen)),
            "failed": 0,
            "wasted_gpu_s": 0.0,
            "recovery_s": round(time.monotonic() - started, 2) if len(set(seen)) == 200 else None,
            "hung": len(set(seen)) < 200,
            "peak_rss_mib": rss.close(),
        }


def bombs() -> dict[str, Any]:
    """12 frames cheap to send and costly to decode, next to a 1,000-prompt victim."""
    payloads = [
        msgpack.packb({"req": "b1", "items": [{"id": "a", "prompt": [0] * 15_000_000}]}),
        msgpack.packb({"req": "b2", "items": [0] * 15_000_000}),
        msgpack.packb({"req": "b3", "items": [{"id": "a", "messages": [[0] * 3000] * 5000}]}),
    ]
    with daemon("--heartbeat-timeout", "3") as d:
        rss = Rss(d.proc.pid)
        victim: list[Any] = []

        def job() -> list[Any]:
            with Client(d.address, timeout=120) as client:
                victim.extend(client.iter_results(items(1000)))
            return []

        thread = threading.Thread(target=job)
        thread.start()
        sock = raw_dealer(d.address)
        started = time.monotonic()
        for _ in range(4):
            for payload in payloads:
                sock.send_multipart([P.MAGIC_VERSION, P.SUBMIT, payload])
        thread.join(90)
        sock.close()
        restarts = sum(w["restarts"] for w in d.status()["workers"])
        return {
            **tally([str(i) for i in range(1000)], victim),
            "wasted_gpu_s": 0.0,
            "recovery_s": round(time.monotonic() - started, 2),
            "hung": thread.is_alive(),
            "worker_restarts": restarts,
            "peak_rss_mib": rss.close(),
        }


CLIENT = """
import sys
from exgen.client import Client
address, n, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
items = ({"id": str(i), "prompt": f"p{i}", "params": {"max_new_tokens": tokens}} for i in range(n))
with Client(address, timeout=300) as client:
    for result in client.iter_results(items):
        print(result.id, "ok" if result.ok else "failed", flush=True)
"""


def client_dies(
    how: str, n: int = 3000, tokens: int = 40, token_ms: int = TOKEN_MS, network: bool = False
) -> dict[str, Any]:
    """A client process with ``n`` prompts out is killed (or stopped) mid-job, on the
    default ipc address or (``network``) on a TCP address of this machine that other
    machines reach, where the heartbeat is longer (``client_heartbeat_s``).

    Wasted: the items that completed for it after its death, and an upper bound of
    the slot-time spent on it: from its death until none of its items ran any more,
    every slot (all capacity of both workers) counted as busy for it."""
    with daemon("--engine-opt", f"token_ms={token_ms}", network=network) as d:
        rss = Rss(d.proc.pid)
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, d.address, str(n), str(tokens)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(20)]
        proc.send_signal({"kill -9": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}[how])
        died = time.monotonic()
        completed = d.status()["completed"]
        stopped_running = gone = None
        while time.monotonic() - died < 60:
            status = d.status()
            busy = int(status["queued"]) + int(status["inflight"])
            if stopped_running is None and int(status["inflight"]) == 0:
                stopped_running = time.monotonic() - died
            if busy == 0:
                gone = time.monotonic() - died
                break
            time.sleep(0.1)
        wasted = d.status()["completed"] - completed
        item_s = tokens * token_ms / 1000
        out: dict[str, Any] = {
            "item_s": item_s,
            "wasted_items": wasted,
            "wasted_batches_per_worker": round(wasted / (WORKERS * CAPACITY), 2),
            # A worker (a GPU) runs CAPACITY items at once: GPU-seconds per item.
            "wasted_gpu_s": round(wasted * item_s / CAPACITY, 2),
            "ran_for_it_s": round(stopped_running, 2) if stopped_running is not None else None,
            "work_cancelled_s": round(gone, 2) if gone is not None else None,
        }
        if how == "SIGSTOP":
            proc.send_signal(signal.SIGCONT)
            rest = proc.stdout.read()
            proc.wait(600)
            got = [line.split() for line in lines + rest.splitlines() if line.strip()]
            ids = [g[0] for g in got]
            out.update(
                lost=n - len(set(ids)),
                duplicated=len(ids) - len(set(ids)),
                failed=sum(1 for g in got if g[1] != "ok"),
                recovery_s=round(time.monotonic() - died, 2),
            )
        else:
            proc.wait(10)
            out.update(lost=0, duplicated=0, failed=0, recovery_s=out["work_cancelled_s"])
        proc.stdout.close()
        out["peak_rss_mib"] = rss.close()
        return out


PAUSING_CLIENT = """
import sys, time
from exgen.client import Client
address, n, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
items = ({"id": str(i), "prompt": f"p{i}", "params": {"max_new_tokens": tokens}} for i in range(n))
with Client(address, timeout=300) as client:
    for k, result in enumerate(client.iter_results(items)):
        print(result.id, "ok" if result.ok else "failed", flush=True)
        if k == 10:
            time.sleep(15)  # the program stops reading: its results pile up unread
"""


def stopped_reader() -> dict[str, Any]:
    """A client (the library) stops reading for 15 s with 4,000 prompts of ~12 kB
    results out; the unread budget is 16 MiB. Another client's job runs meanwhile."""
    budget = 16 * MiB
    env = {"EXGEN_UNREAD_BUDGET_BYTES": str(budget)}
    with daemon("--engine-opt", "token_ms=1", "--engine-opt", "capacity=32", env=env) as d:
        rss = Rss(d.proc.pid)
        proc = subprocess.Popen(
            [sys.executable, "-c", PAUSING_CLIENT, d.address, "4000", "2000"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(11)]
        time.sleep(8)
        reasons = {c.get("paused") for c in d.status().get("clients", []) if c.get("queued")}
        started = time.monotonic()
        with Client(d.address, timeout=60) as client:
            other = list(client.iter_results(items(300)))
        other_s = time.monotonic() - started
        rest = proc.stdout.read()
        proc.wait(300)
        proc.stdout.close()
        got = [line.split() for line in lines + rest.splitlines() if line.strip()]
        ids = [g[0] for g in got]
        return {
            "lost": 4000 - len(set(ids)),
            "duplicated": len(ids) - len(set(ids)),
            "failed": sum(1 for g in got if g[1] != "ok") + sum(1 for r in other if not r.ok),
            "wasted_gpu_s": 0.0,
            "recovery_s": None,
            "other_client_300_s": round(other_s, 2),
            "reader_paused_for": sorted(r for r in reasons if r),
            "unread_budget_mib": budget // MiB,
            "peak_rss_mib": rss.close(),
        }


def big_prompts(chat: bool) -> dict[str, Any]:
    """Prompts of 1 MB (or chat items of 2,000 short messages) offered until busy."""
    with daemon("--engine-opt", "token_ms=200", env={"EXGEN_MAX_QUEUE_BYTES": str(256 * MiB)}) as d:
        rss = Rss(d.proc.pid)
        sock = raw_dealer(d.address)
        if chat:
            messages = [{"role": "user", "content": f"m{i}"} for i in range(1000)]
            item: dict[str, Any] = {"messages": messages}
        else:
            item = {"prompt": "y" * 1_000_000}  # one long "word": no prompt_too_long
        offered = 400 if not chat else 2000
        for n in range(offered):
            body = {"req": f"r{n}", "items": [{"id": str(n), **item}]}
            sock.send_multipart(P.pack(P.SUBMIT, body))
        busy = accepted = 0
        deadline = time.monotonic() + 60
        while busy + accepted < offered and time.monotonic() < deadline:
            if sock.poll(500):
                command, body = P.unpack(sock.recv_multipart())
                busy += command == P.ERROR and body.get("code") == P.E_BUSY
                accepted += command == P.ACCEPTED
        sock.close()
        sent_mib = len(msgpack.packb(item)) * accepted / MiB
        return {
            "lost": 0, "duplicated": 0, "failed": 0, "wasted_gpu_s": 0.0, "recovery_s": None,
            "accepted": accepted, "busy": busy, "accepted_mib": round(sent_mib, 1),
            "peak_rss_mib": rss.close(),
        }  # fmt: skip


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "link-reset": link_reset,
    "burst": burst,
    "bombs": bombs,
    "client-kill-9": lambda: client_dies("kill -9"),
    "client-sigstop": lambda: client_dies("SIGSTOP"),
    # GPU-like items: 200 tokens at 20 ms, 4 s each (a batch of 8 per worker).
    "client-kill-9-long": lambda: client_dies("kill -9", 400, 200, 20),
    "client-sigstop-long": lambda: client_dies("SIGSTOP", 400, 200, 20),
    "client-sigstop-network": lambda: client_dies("SIGSTOP", network=True),
    "client-sigstop-long-network": lambda: client_dies("SIGSTOP", 400, 200, 20, network=True),
    "stopped-reader": stopped_reader,
    "big-prompts": lambda: big_prompts(chat=False),
    "chat-items": lambda: big_prompts(chat=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    out = {}
    for name in args.only or SCENARIOS:
        print(f"scenario {name}", file=sys.stderr, flush=True)
        out[name] = SCENARIOS[name]()
        print(json.dumps(out[name]), file=sys.stderr, flush=True)
    print(json.dumps({"protocol": P.PROTOCOL_VERSION, "scenarios": out}, indent=2))


if __name__ == "__main__":
    main()
