"""Ray mode against local mode on one machine.

1. Throughput: the same synthetic workloads through a local daemon (2 CPU worker
   slots) and a Ray-mode daemon (2 slots, one actor on each of 2 nodes of Ray's
   test cluster on this machine; workers connect back over TCP + CURVE), in
   alternating rounds so that load on the shared machine hits both alike. Medians,
   and the Ray ÷ local ratio of each pair of rounds.
   - zero-cost: every job ends in one step (token_ms 0, one token, capacity 32):
     the daemon's own path dominates, so the transport's cost shows.
   - paced: 5 ms a step, 16 tokens, capacity 8 — a (small) model's pace.
2. Recovery: 8 equal jobs (each ``--job-s`` long) on 2 Ray slots, 4 on each; the
   node of one slot is removed without warning (raylet SIGKILLed). Measured from
   the removal: until the router has taken the lost node's prompts back (the slot
   leaves ``ready`` in status), and until every prompt has finished elsewhere.
   With fast health checks (200 ms × 3, as the tests) and with Ray's defaults.

    .venv/bin/python bench/ray_mode.py --rounds 5

Prints one JSON document. Nothing leaves loopback; every cluster is shut down.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchlib import ROOT, Daemon, emit, machine, median, running_daemon

sys.path.insert(0, str(ROOT))  # the test cluster helper lives with the tests
from tests.raycluster import DAEMON_CONFIG, LOOPBACK_ENV, local_ray_cluster

logger = logging.getLogger("bench.ray_mode")

WORKLOADS = {
    "zero-cost": ({"token_ms": 0, "capacity": 32}, 1),
    "paced": ({"token_ms": 5, "capacity": 8, "paced": 1}, 16),
}


def prompts_per_s(daemon: Daemon, prompts: int, max_new_tokens: int) -> float:
    items = ({"id": str(i), "prompt": f"p{i}"} for i in range(prompts))
    done = 0
    with daemon.client(timeout=60, window=8192) as client:
        started = time.perf_counter()
        for result in client.iter_results(items, max_new_tokens=max_new_tokens):
            done += result.ok
        elapsed = time.perf_counter() - started
    if done != prompts:
        raise RuntimeError(f"{prompts - done} prompts failed")
    return prompts / elapsed


def ray_args(config: Path, address: str) -> tuple[str, ...]:
    return ("--ray", address, "--config", str(config), "--log-level", "warning")


def throughput(address: str, config: Path, rounds: int, sizes: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (opts, tokens) in WORKLOADS.items():
        with ExitStack() as stack:
            local = stack.enter_context(running_daemon(2, "synthetic", opts))
            ray = stack.enter_context(
                running_daemon(2, "synthetic", opts, *ray_args(config, address), env=LOOPBACK_ENV)
            )
            prompts_per_s(local, 200, tokens)  # warm both paths
            prompts_per_s(ray, 200, tokens)
            runs: dict[str, list[float]] = {"local": [], "ray": []}
            for i in range(rounds):
                # Alternate who goes first, so neither always runs on a fresher machine.
                order = [("local", local), ("ray", ray)][:: 1 if i % 2 == 0 else -1]
                for mode, daemon in order:
                    runs[mode].append(prompts_per_s(daemon, sizes[name], tokens))
                logger.info("%s round %d: %s", name, i, {k: round(v[-1]) for k, v in runs.items()})
        ratios = [r / loc for r, loc in zip(runs["ray"], runs["local"], strict=True)]
        out[name] = {
            "prompts": sizes[name],
            "local": round(median(runs["local"])),
            "ray": round(median(runs["ray"])),
            "ratio": round(median(ratios), 3),
            "runs": {k: [round(x) for x in v] for k, v in runs.items()},
        }
    return out


def recovery(fast: bool, rounds: int, job_s: float, tmp: Path) -> dict[str, Any]:
    """Node loss → prompts taken back → prompts finished elsewhere, ``rounds`` times."""
    token_ms = 20
    opts = {"token_ms": token_ms, "capacity": 32, "paced": 1}
    tokens = max(1, round(job_s * 1000 / token_ms))
    detected: list[float] = []
    finished: list[float] = []
    with local_ray_cluster(nodes=2, fast_health_checks=fast) as cluster:
        config = tmp / f"ray-{fast}.toml"
        config.write_text(DAEMON_CONFIG)
        args = ray_args(config, cluster.address)
        with running_daemon(2, "synthetic", opts, *args, env=LOOPBACK_ENV) as daemon:
            for _ in range(rounds):
                took = one_loss(cluster, daemon, tokens)
                detected.append(took[0])
                finished.append(took[1])
                cluster.add_node()
                wait_all_ready(daemon, 2)
    return {
        "health_checks": "200 ms x 3" if fast else "Ray defaults",
        "job_s": job_s,
        "detected_s": round(median(detected), 2),
        "finished_s": round(median(finished), 2),
        "runs": {"detected": [round(x, 2) for x in detected],
                 "finished": [round(x, 2) for x in finished]},
    }  # fmt: skip


def one_loss(cluster: Any, daemon: Daemon, tokens: int) -> tuple[float, float]:
    ends: list[float] = []
    job = threading.Thread(target=run_job, args=(daemon, 8, tokens, ends))
    job.start()
    wait_inflight(daemon, 8)
    status = {w["slot"]: w for w in daemon.status()["workers"]}
    victim = status[1]
    assert victim["inflight"] > 0, "the lost slot must hold prompts"
    removed = time.monotonic()
    cluster.remove_node(victim["node"])
    detected = None
    while job.is_alive():
        if detected is None and slot_state(daemon, 1) != "ready":
            detected = time.monotonic() - removed
        time.sleep(0.02)
    job.join()
    if not ends:
        raise RuntimeError("the job failed")
    return detected if detected is not None else float("nan"), ends[0] - removed


def run_job(daemon: Daemon, n: int, tokens: int, ends: list[float]) -> None:
    items = [{"id": f"r{i}", "prompt": f"recovery {i}"} for i in range(n)]
    with daemon.client(timeout=120) as client:
        results = client.generate(items, max_new_tokens=tokens)
    if all(r.ok for r in results):
        ends.append(time.monotonic())


def slot_state(daemon: Daemon, slot: int) -> str:
    return str(next(w["state"] for w in daemon.status()["workers"] if w["slot"] == slot))


def wait_inflight(daemon: Daemon, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.status()["inflight"] >= n:
            return
        time.sleep(0.02)
    raise RuntimeError(f"{n} prompts never in flight")


def wait_all_ready(daemon: Daemon, n: int, timeout: float = 60.0) -> None:
    with daemon.client() as client:
        client.wait_ready(timeout=timeout, count=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--zero-cost-prompts", type=int, default=20000)
    parser.add_argument("--paced-prompts", type=int, default=1000)
    parser.add_argument("--recovery-rounds", type=int, default=3)
    parser.add_argument("--job-s", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sizes = {"zero-cost": args.zero_cost_prompts, "paced": args.paced_prompts}
    with tempfile.TemporaryDirectory(prefix="exgen-raybench-") as tmp_dir:
        tmp = Path(tmp_dir)
        with local_ray_cluster(nodes=2) as cluster:
            config = tmp / "ray.toml"
            config.write_text(DAEMON_CONFIG)
            speed = throughput(cluster.address, config, args.rounds, sizes)
        losses = [
            recovery(fast, args.recovery_rounds, args.job_s, tmp) for fast in (True, False)
        ]
    emit({"machine": machine(), "throughput": speed, "recovery": losses})


if __name__ == "__main__":
    main()
