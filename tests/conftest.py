"""Fixtures that start a real daemon (`exgen serve` as a subprocess) on a private
ipc address, and stop it with SIGTERM afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exgen.client import Client, errors

ROOT = Path(__file__).resolve().parents[1]
EXGEN = [sys.executable, "-m", "exgen.daemon.cli"]
EXGEN_CLIENT = [sys.executable, "-m", "exgen.client.cli"]


class RunningDaemon:
    def __init__(self, proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
        self.proc = proc
        self.address = address
        self.log = log

    def client(self, **kwargs: Any) -> Client:
        return Client(self.address, **kwargs)

    def status(self) -> dict[str, Any]:
        with self.client(timeout=10) as client:
            return client.status()

    def wait_ready(self, timeout: float = 60.0, count: int | None = None) -> dict[str, Any]:
        """Until every slot (or ``count`` of them) is ready; the status then."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"daemon exited {self.proc.returncode}:\n{self.log_text()}"
                    )
                try:
                    return client.wait_ready(timeout=1, count=count)
                except errors.Timeout:
                    continue  # still loading: look at the process again
        raise AssertionError(f"workers not ready in {timeout}s\n{self.log_text()}")

    def worker_pids(self) -> dict[int, int]:
        return {w["slot"]: w["pid"] for w in self.status()["workers"] if w["pid"]}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop on SIGTERM:\n{self.log_text()}") from None


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``predicate`` every 50 ms until it holds; the seconds that took. Past
    ``timeout`` an AssertionError naming ``what``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def submit_batch(
    address: str,
    lines: Iterable[dict[str, Any]],
    tmp_path: Path,
    *,
    returncode: int = 0,
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """`exgen-client submit` of ``lines`` (a JSONL file in ``tmp_path``) with ``-o``, as a
    user runs it; asserts its exit status is ``returncode``; the output file's records."""
    src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = subprocess.run(
        [*EXGEN_CLIENT, "submit", str(src), "-o", str(out), "--connect", address],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == returncode, run.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def start_daemon(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, listen: str | None = None
) -> RunningDaemon:
    address = listen or f"ipc://{tmp_path}/exgen.sock"
    log = tmp_path / "daemon.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("EXGEN_ADDRESS", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*EXGEN, "serve", "--listen", address, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    return RunningDaemon(proc, address, log)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningDaemon] = []

    def factory(
        *args: str,
        ready: bool = True,
        env: dict[str, str] | None = None,
        listen: str | None = None,
    ) -> RunningDaemon:
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        daemon = start_daemon(sub, *args, env=env, listen=listen)
        started.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    yield factory
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.stop()
