"""The HTTP gateway against the ZMQ client on the same daemon.

One `exgen serve --http` with a zero-cost synthetic engine (token_ms = batch_ms = 0),
so what is measured is the front's own cost:

- Added latency: one request at a time, alternating a ZMQ ``Client.generate`` of one
  prompt with a ``POST /v1/completions`` over a kept-alive HTTP connection (stdlib
  http.client, no SDK overhead), both for 1 token; p50 and p99 of each, and their
  differences (what the HTTP front adds). The openai SDK's own round trip is shown
  too, for what a Python caller sees.
- Requests/s: ``--concurrency`` callers at once, each sending requests one after
  another: over HTTP (asyncio keep-alive connections), and over ZMQ both with as
  many AsyncClients and with all of them on one shared AsyncClient (what the
  gateway does: the cost of multiplexing, side by side).
- Streaming time to first token: a paced engine (``--stream-token-ms`` per token),
  the first text chunk of a ``stream: true`` chat request against
  ``Client.stream``'s first chunk.
- Batch throughput: the same ``--batch-lines`` file through ``/v1/batches`` (upload,
  create, poll until completed) and through ``exgen-client submit``.

    .venv/bin/python bench/http_bench.py --repeat 3

Prints one JSON document (stdout) and a Markdown table (stderr) for RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
from benchlib import ROOT, Daemon, emit, machine, median, percentile, running_daemon

from exgen.client import AsyncClient
from exgen.client.batch_api import BatchApi

sys.path.insert(0, str(ROOT))  # the shared helpers live with the tests
from tests.netutil import free_port

logger = logging.getLogger("bench.http")

ZERO_COST = {"token_ms": 0, "batch_ms": 0}
WARMUP = 20


@contextlib.contextmanager
def http_daemon(workers: int, opts: dict[str, Any]) -> Iterator[tuple[Daemon, str]]:
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="exgen-http-bench-") as state,
        running_daemon(
            workers, "synthetic", opts, "--http", f"127.0.0.1:{port}", "--http-state-dir", state
        ) as daemon,
    ):
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield daemon, url


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]))
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"no healthy gateway at {url}")


# --- latency ---------------------------------------------------------------------------


def latencies(daemon: Daemon, url: str, samples: int) -> dict[str, list[float]]:
    """Seconds per round trip, one at a time, ZMQ and HTTP alternating."""
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port)
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    out: dict[str, list[float]] = {"zmq": [], "http": [], "sdk": []}
    with daemon.client(timeout=30) as client:
        for i in range(samples + WARMUP):
            started = time.perf_counter()
            [result] = client.generate([f"latency {i}"], max_new_tokens=1)
            zmq_s = time.perf_counter() - started
            result.raise_for_error()
            body = json.dumps({"model": "x", "prompt": f"latency {i}", "max_tokens": 1})
            started = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            http_s = time.perf_counter() - started
            assert reply.status == 200, reply.status
            started = time.perf_counter()
            sdk.completions.create(model="x", prompt=f"latency {i}", max_tokens=1)
            sdk_s = time.perf_counter() - started
            if i >= WARMUP:
                out["zmq"].append(zmq_s)
                out["http"].append(http_s)
                out["sdk"].append(sdk_s)
    conn.close()
    sdk.close()
    return out


# --- requests/s --------------------------------------------------------------------------


async def _http_caller(port: int, requests: int, index: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(requests):
            body = json.dumps({"model": "x", "prompt": f"c{index} r{i}", "max_tokens": 1})
            writer.write(
                (
                    f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                ).encode()
            )
            await writer.drain()
            status = (await reader.readline()).split()[1]
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            assert status == b"200", status
    finally:
        writer.close()


async def _zmq_calls(client: AsyncClient, requests: int, index: int) -> None:
    for i in range(requests):
        [result] = await client.generate([f"c{index} r{i}"], max_new_tokens=1)
        result.raise_for_error()


async def _zmq_callers(address: str, per_caller: int, concurrency: int, shared: bool) -> None:
    """``concurrency`` callers on one shared AsyncClient (as the gateway has it), or
    each on a client of its own."""
    clients = [AsyncClient(address, timeout=30) for _ in range(1 if shared else concurrency)]
    try:
        calls = (_zmq_calls(clients[c % len(clients)], per_caller, c) for c in range(concurrency))
        await asyncio.gather(*calls)
    finally:
        for client in clients:
            client.close()


async def _http_callers(port: int, per_caller: int, concurrency: int) -> None:
    await asyncio.gather(*(_http_caller(port, per_caller, c) for c in range(concurrency)))


def requests_per_s(daemon: Daemon, url: str, concurrency: int, total: int) -> dict[str, float]:
    per_caller = max(1, total // concurrency)
    port = int(url.rsplit(":", 1)[1])
    runs: dict[str, Any] = {
        "http": lambda: _http_callers(port, per_caller, concurrency),
        "zmq": lambda: _zmq_callers(daemon.address, per_caller, concurrency, shared=False),
        "zmq_shared": lambda: _zmq_callers(daemon.address, per_caller, concurrency, shared=True),
    }
    out = {}
    for name, make in runs.items():
        started = time.perf_counter()
        asyncio.run(make())
        out[name] = per_caller * concurrency / (time.perf_counter() - started)
    return out


# --- streaming -----------------------------------------------------------------------------


def first_token_times(
    daemon: Daemon, url: str, samples: int, tokens: int
) -> dict[str, list[float]]:
    """Seconds to the first text chunk; every stream is read to its end (a stream left
    open would go on under the next one's feet)."""
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    out: dict[str, list[float]] = {"http": [], "zmq": []}
    chat = [{"role": "user", "content": "stream to me"}]
    with daemon.client(timeout=30) as client:
        for i in range(samples + 3):  # three to warm up
            started = time.perf_counter()
            first = None
            for chunk in sdk.chat.completions.create(
                model="x",
                messages=chat,
                max_tokens=tokens,
                stream=True,  # type: ignore[arg-type]
            ):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
            started = time.perf_counter()
            zmq_first = None
            for text in client.stream(chat, max_new_tokens=tokens):
                if zmq_first is None and text:
                    zmq_first = time.perf_counter() - started
            if i >= 3 and first is not None and zmq_first is not None:
                out["http"].append(first)
                out["zmq"].append(zmq_first)
    sdk.close()
    return out


# --- batch throughput ----------------------------------------------------------------------


def batch_file(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            body = {
                "model": "x",
                "messages": [{"role": "user", "content": f"q{i}"}],
                "max_tokens": 4,
            }
            line = {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            f.write(json.dumps(line) + "\n")


def batch_rates(daemon: Daemon, url: str, path: Path, lines: int) -> dict[str, float]:
    api = BatchApi(url)
    started = time.perf_counter()
    file = api.upload(path)
    batch = api.create_batch(file["id"], "/v1/chat/completions")
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        batch = api.get_batch(batch["id"])
    via_http = time.perf_counter() - started
    assert batch["request_counts"]["completed"] == lines, batch
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "exgen.client.cli", "submit", str(path), "-o",
             f"{tmp}/out.jsonl", "--connect", daemon.address, "--no-progress"],
            check=True, capture_output=True,
        )  # fmt: skip
        via_submit = time.perf_counter() - started
    return {"batches_api": lines / via_http, "exgen_client_submit": lines / via_submit}


# --- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        batch_file(path, args.batch_lines)
        with http_daemon(args.workers, ZERO_COST) as (daemon, url):
            for round_ in range(args.repeat):
                lat = latencies(daemon, url, args.latency_samples)
                rps = requests_per_s(daemon, url, args.concurrency, args.requests)
                rates = batch_rates(daemon, url, path, args.batch_lines)
                rounds.append({"lat": lat, "rps": rps, "batch": rates})
                logger.info(
                    "round %d: p50 zmq %.3f ms, http %.3f ms; %.0f vs %.0f req/s; "
                    "batch %.0f vs %.0f lines/s",
                    round_ + 1, percentile(lat["zmq"], 50) * 1e3, percentile(lat["http"], 50) * 1e3,
                    rps["http"], rps["zmq"], rates["batches_api"], rates["exgen_client_submit"],
                )  # fmt: skip
        paced = {"token_ms": args.stream_token_ms, "paced": 1}
        with http_daemon(args.workers, paced) as (daemon, url):
            ttft = first_token_times(daemon, url, args.stream_samples, args.stream_tokens)
    return summarize(args, rounds, ttft)


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1e3, 3)


def summarize(
    args: argparse.Namespace, rounds: list[dict[str, Any]], ttft: dict[str, list[float]]
) -> dict[str, Any]:
    def per_round(fn: Any) -> list[float]:
        return [fn(r) for r in rounds]

    added_p50 = per_round(lambda r: _ms(r["lat"]["http"], 50) - _ms(r["lat"]["zmq"], 50))
    added_p99 = per_round(lambda r: _ms(r["lat"]["http"], 99) - _ms(r["lat"]["zmq"], 99))
    return {
        "bench": "http",
        "workers": args.workers,
        "runs": args.repeat,
        "zmq_p50_ms": median(per_round(lambda r: _ms(r["lat"]["zmq"], 50))),
        "zmq_p99_ms": median(per_round(lambda r: _ms(r["lat"]["zmq"], 99))),
        "http_p50_ms": median(per_round(lambda r: _ms(r["lat"]["http"], 50))),
        "http_p99_ms": median(per_round(lambda r: _ms(r["lat"]["http"], 99))),
        "sdk_p50_ms": median(per_round(lambda r: _ms(r["lat"]["sdk"], 50))),
        "added_p50_ms_runs": [round(x, 3) for x in added_p50],
        "added_p50_ms": round(median(added_p50), 3),
        "added_p99_ms": round(median(added_p99), 3),
        "concurrency": args.concurrency,
        "http_requests_per_s": round(median(per_round(lambda r: r["rps"]["http"]))),
        "zmq_requests_per_s": round(median(per_round(lambda r: r["rps"]["zmq"]))),
        "http_requests_per_s_runs": [round(r["rps"]["http"]) for r in rounds],
        "zmq_shared_requests_per_s": round(median(per_round(lambda r: r["rps"]["zmq_shared"]))),
        "zmq_shared_ratio_runs": [
            round(r["rps"]["zmq_shared"] / r["rps"]["zmq"], 3) for r in rounds
        ],
        "stream_token_ms": args.stream_token_ms,
        "ttft_http_p50_ms": _ms(ttft["http"], 50),
        "ttft_zmq_p50_ms": _ms(ttft["zmq"], 50),
        "ttft_http_p99_ms": _ms(ttft["http"], 99),
        "batch_lines": args.batch_lines,
        "batches_api_lines_per_s": round(median(per_round(lambda r: r["batch"]["batches_api"]))),
        "submit_lines_per_s": round(median(per_round(lambda r: r["batch"]["exgen_client_submit"]))),
        "batch_ratio_runs": [
            round(r["batch"]["batches_api"] / r["batch"]["exgen_client_submit"], 3) for r in rounds
        ],
    }


def markdown(doc: dict[str, Any]) -> str:
    goal = "**met**" if doc["added_p50_ms"] <= 2 else "**not met**"
    ratio = median(doc["batch_ratio_runs"])
    return "\n".join(
        [
            "| measure | HTTP gateway | ZMQ client | difference |",
            "|---|---|---|---|",
            f"| round trip p50, 1 token, one at a time | {doc['http_p50_ms']:.3f} ms "
            f"| {doc['zmq_p50_ms']:.3f} ms | {doc['added_p50_ms']:+.3f} ms (runs "
            f"{doc['added_p50_ms_runs']}; goal ≤ 2 ms: {goal}) |",
            f"| round trip p99 | {doc['http_p99_ms']:.3f} ms | {doc['zmq_p99_ms']:.3f} ms "
            f"| {doc['added_p99_ms']:+.3f} ms |",
            f"| requests/s, {doc['concurrency']} callers | {doc['http_requests_per_s']:,} "
            f"(runs {doc['http_requests_per_s_runs']}) | {doc['zmq_requests_per_s']:,} | "
            f"{doc['http_requests_per_s'] / doc['zmq_requests_per_s']:.2f}× |",
            f"| requests/s, {doc['concurrency']} callers on one shared AsyncClient (ZMQ) | "
            f"| {doc['zmq_shared_requests_per_s']:,} | {median(doc['zmq_shared_ratio_runs']):.2f}×"
            f" a client each (runs {doc['zmq_shared_ratio_runs']}) |",
            f"| time to first token, streamed chat ({doc['stream_token_ms']} ms/token) "
            f"| {doc['ttft_http_p50_ms']:.2f} ms (p99 {doc['ttft_http_p99_ms']:.2f}) "
            f"| {doc['ttft_zmq_p50_ms']:.2f} ms | "
            f"{doc['ttft_http_p50_ms'] - doc['ttft_zmq_p50_ms']:+.2f} ms |",
            f"| batch of {doc['batch_lines']:,} lines, lines/s | {doc['batches_api_lines_per_s']:,}"
            f" (/v1/batches) | {doc['submit_lines_per_s']:,} (exgen-client submit) "
            f"| {ratio:.2f}× (runs {doc['batch_ratio_runs']}) |",
            f"| the openai SDK's round trip p50 (its own client cost included) "
            f"| {doc['sdk_p50_ms']:.3f} ms | | |",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3200)
    parser.add_argument("--batch-lines", type=int, default=20_000)
    parser.add_argument("--stream-token-ms", type=float, default=20)
    parser.add_argument("--stream-tokens", type=int, default=16)
    parser.add_argument("--stream-samples", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise
    os.environ.pop("EXGEN_HTTP_URL", None)
    doc = {"machine": machine(), **run(parse_args(argv))}
    emit(doc)
    print(markdown(doc), file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
