"""`make demo`: start the daemon on the embedded demo model with 2 workers, submit the
seeds' workload (examples/prompts.jsonl: ten famous first lines × 10, 100 new tokens
each), print a few results and the tokens/s, stop the daemon.

Every step is the same command a user would type; the daemon's own log goes to
stderr so you can watch it load and serve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exgen.client import Client, errors

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "examples" / "prompts.jsonl"
WORKERS = int(os.environ.get("EXGEN_DEMO_WORKERS", "2"))


def start_daemon(address: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "exgen.daemon.cli", "serve", "--workers", str(WORKERS)]
    command += ["--listen", address]
    print(f"$ exgen serve --workers {WORKERS} --listen {address}", flush=True)
    return subprocess.Popen(command)


def wait_ready(address: str, daemon: subprocess.Popen[bytes], timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    with Client(address) as client:
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                sys.exit(f"demo: the daemon exited with code {daemon.returncode}")
            try:
                return client.wait_ready(timeout=2)
            except errors.Timeout:
                continue  # still loading: look at the daemon again
    sys.exit("demo: the workers did not become ready in time")


def submit(address: str, output: Path) -> float:
    command = [sys.executable, "-m", "exgen.client.cli", "submit", str(PROMPTS)]
    command += ["-o", str(output), "--connect", address]
    print(f"$ exgen-client submit {PROMPTS.relative_to(ROOT)} -o {output}", flush=True)
    started = time.monotonic()
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        sys.exit(f"demo: exgen-client submit exited with code {code}")
    return time.monotonic() - started


def show(output: Path, elapsed: float, status: dict) -> None:
    prompts = {}
    for line in PROMPTS.read_text().splitlines():
        item = json.loads(line)
        prompts[item["id"]] = item["prompt"]
    results = [json.loads(line) for line in output.read_text().splitlines()]
    tokens = sum(r["completion_tokens"] for r in results)
    print("\n--- a few results ---")
    # One result each of three different prompts (ids are pNN-rM: prompt NN, repeat M).
    firsts = {r["id"].split("-")[0]: r for r in reversed(results)}
    for result in [firsts[k] for k in sorted(firsts)][::4][:3]:
        print(f"\n[{result['id']}] {prompts[result['id']]}")
        print(f"  → {result['text'].strip()[:400]}")
    load = ", ".join(f"slot {w['slot']} {w['load_s']:.1f}s" for w in status["workers"])
    print("\n--- summary ---")
    failed = sum(1 for r in results if r["error"])
    workers = len(status["workers"])
    print(f"results:     {len(results)} of {len(prompts)}, {failed} failed")
    print(f"model:       {status.get('model')} on {workers} workers ({status.get('engine')})")
    print(f"load time:   {load}")
    print(f"generated:   {tokens} tokens in {elapsed:.1f}s = {tokens / elapsed:.1f} tokens/s")


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="exgen-demo-"))
    address = f"ipc://{workdir}/exgen.sock"
    daemon = start_daemon(address)
    try:
        status = wait_ready(address, daemon)
        output = workdir / "results.jsonl"
        elapsed = submit(address, output)
        show(output, elapsed, status)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
    if code != 0:
        sys.exit(f"demo: the daemon exited with code {code}")
    print(f"results file: {workdir / 'results.jsonl'}")


if __name__ == "__main__":
    main()
