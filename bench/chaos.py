"""Chaos run: push a job through a real daemon while killing workers at random.

Starts ``exgen serve`` with the synthetic engine on a private ipc socket, submits
``--prompts`` items through the client library, and every ``--kill-every`` seconds
sends SIGKILL to a random worker process. At the end it checks what the user sees:
every id answered exactly once, and how many answers were errors.

    python bench/chaos.py --prompts 20000 --workers 4 --kill-every 0.5

Prints one JSON object: scenario, prompts, kills, lost, duplicated, failed, wall_s.
Exit status 1 when anything was lost, duplicated or failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from exgen.client import Client

logger = logging.getLogger("bench.chaos")


def start_daemon(rundir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    address = f"ipc://{rundir}/exgen.sock"
    cmd = [
        sys.executable, "-m", "exgen.daemon.cli", "serve", "--listen", address,
        "--engine", "synthetic", "--workers", str(args.workers),
        "--engine-opt", f"token_ms={args.token_ms}", "--engine-opt", f"capacity={args.capacity}",
        "--max-attempts", str(args.max_attempts), "--log-level", "info",
    ]  # fmt: skip
    env = {**os.environ, "EXGEN_RESTART_BACKOFF_S": str(args.restart_backoff)}
    env.pop("EXGEN_ADDRESS", None)
    log = (rundir / "daemon.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), address


def wait_ready(address: str, workers: int, timeout: float = 60.0) -> dict[str, Any]:
    with Client(address) as client:
        return client.wait_ready(timeout=timeout, count=workers)


class Killer(threading.Thread):
    """SIGKILLs a random worker (a child of the daemon) every ``every`` seconds."""

    def __init__(self, daemon_pid: int, every: float, seed: int) -> None:
        super().__init__(name="killer", daemon=True)
        self.daemon_proc = psutil.Process(daemon_pid)
        self.every = every
        self.rng = random.Random(seed)
        self.kills = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            workers = self.daemon_proc.children()
            if not workers:
                continue
            victim = self.rng.choice(workers)
            try:
                victim.send_signal(signal.SIGKILL)
                self.kills += 1
            except psutil.NoSuchProcess:
                pass


def run_job(address: str, args: argparse.Namespace) -> tuple[Counter[str], int, list[str]]:
    items = ({"id": f"c{i}", "prompt": f"chaos prompt {i}"} for i in range(args.prompts))
    seen: Counter[str] = Counter()
    failures: list[str] = []
    next_report = time.monotonic() + 5
    with Client(address, timeout=60) as client:
        for result in client.iter_results(items, max_new_tokens=args.max_new_tokens):
            seen[result.id] += 1
            if not result.ok:
                failures.append(f"{result.id}: {result.error}")
            if time.monotonic() > next_report:
                next_report = time.monotonic() + 5
                report_progress(address, len(seen))
    return seen, len(failures), failures[:5]


def report_progress(address: str, done: int) -> None:
    """One line on stderr: how far along, and what the slots are doing."""
    with Client(address, timeout=5) as probe:
        status = probe.status()
    states = Counter(w["state"] for w in status["workers"])
    print(
        f"{done} done, {status['queued']} queued, {status['inflight']} in flight, "
        f"slots {dict(states)}",
        file=sys.stderr,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=0.5)
    parser.add_argument("--token-ms", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--restart-backoff", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path, help="Keep the daemon's log here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="exgen-chaos-") as tmp:
        proc, address = start_daemon(Path(tmp), args)
        try:
            wait_ready(address, args.workers)
            killer = Killer(proc.pid, args.kill_every, args.seed)
            started = time.monotonic()
            killer.start()
            seen, failed, examples = run_job(address, args)
            wall = time.monotonic() - started
            killer.halt.set()
            killer.join()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            if args.log:
                args.log.write_bytes((Path(tmp) / "daemon.log").read_bytes())
    expected = {f"c{i}" for i in range(args.prompts)}
    report = {
        "scenario": f"kill -9 a random worker every {args.kill_every:g}s",
        "workers": args.workers,
        "prompts": args.prompts,
        "kills": killer.kills,
        "lost": len(expected - set(seen)),
        "duplicated": sum(1 for c in seen.values() if c > 1),
        "failed": failed,
        "failed_examples": examples,
        "wall_s": round(wall, 1),
    }
    print(json.dumps(report))
    return 1 if report["lost"] or report["duplicated"] or report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
