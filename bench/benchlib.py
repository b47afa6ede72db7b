"""Helpers shared by the benchmarks: a real daemon on a private socket, statistics,
the seeds' workload, and the facts about the machine that go into RESULTS.md.

Every benchmark prints one JSON document on stdout (its numbers) so that
``bench/run_all.py`` can collect them; logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from exgen.client import Client, errors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helpers shared with tests/
from tests.netutil import free_port

ROOT = Path(__file__).resolve().parents[1]
SEEDS_PROMPTS = ROOT / "examples" / "prompts.jsonl"


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def client(self, **kwargs: Any) -> Client:
        return Client(self.address, **kwargs)

    def status(self) -> dict[str, Any]:
        with self.client(timeout=30) as client:
            return client.status()


def _wait_ready(daemon: Daemon, workers: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with daemon.client() as client:
        while time.monotonic() < deadline:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{daemon.log.read_text()[-3000:]}")
            try:
                return client.wait_ready(timeout=2, count=workers)
            except errors.Timeout:
                continue  # still loading: look at the daemon again
    raise RuntimeError(
        f"{workers} workers not ready in {timeout:.0f}s:\n{daemon.log.read_text()[-3000:]}"
    )


@contextlib.contextmanager
def running_daemon(
    workers: int,
    engine: str,
    engine_opts: dict[str, Any],
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    gpus: str | None = None,
    tcp: bool = False,
    host: str = "127.0.0.1",
) -> Iterator[Daemon]:
    """``exgen serve`` as a subprocess on a private ipc socket (``tcp``: on a free
    TCP port of ``host``; one other machines reach runs ``--insecure``), ready;
    SIGTERM at the end. ``workers`` CPU slots, or with ``gpus`` (``--gpus``) that
    many GPU slots."""
    with tempfile.TemporaryDirectory(prefix="exgen-bench-") as tmp:
        address = f"tcp://{host}:{free_port()}" if tcp else f"ipc://{tmp}/exgen.sock"
        if tcp and host != "127.0.0.1":
            extra = ("--insecure", *extra)
        opts = [arg for k, v in engine_opts.items() for arg in ("--engine-opt", f"{k}={v}")]
        slots = ["--gpus", gpus] if gpus else ["--workers", str(workers)]
        cmd = [
            sys.executable, "-m", "exgen.daemon.cli", "serve", "--listen", address,
            "--engine", engine, *slots, "--log-level", "warning", *opts, *extra,
        ]  # fmt: skip
        full_env = {**os.environ, **(env or {})}
        full_env.pop("EXGEN_ADDRESS", None)
        log = Path(tmp) / "daemon.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        daemon = Daemon(proc, address, log)
        try:
            _wait_ready(daemon, workers, timeout)
            yield daemon
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank: no interpolation between samples."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[rank])


def seeds_prompts(path: Path = SEEDS_PROMPTS) -> list[dict[str, Any]]:
    """The seeds' workload: ten "best first line" prompts × 10, 100 new tokens each."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, load, versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version()}
    for dist in ("exgen", "torch", "transformers", "accelerate", "pyzmq", "msgpack"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
        "git": _git_head(),
    }


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=2))
