"""Ray mode on Ray's own test cluster: a head and two nodes on this machine,
each with one unit of a custom resource standing in for a GPU.

Real daemon (`exgen serve --ray ADDRESS`), real actors, real worker processes that
connect back over TCP with CURVE, real `kill -9`, a node removed without warning and
added again. What is asserted is what a user sees: every id exactly once, the slots'
nodes in status, the slot back when a node rejoins.

One cluster for the module (tests/raycluster.py: loopback only, a private temp dir,
shut down whatever happens). Node deaths are detected fast here (200 ms × 3 health
checks); Ray's defaults take ~15 s (docs/cluster.md).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exgen.client import errors
from exgen.daemon.config import Settings
from tests.conftest import RunningDaemon, start_daemon
from tests.integration.test_fault_tolerance import (
    assert_each_once_ok,
    read_output,
    submit_cli,
    wait_for,
    write_prompts,
)
from tests.raycluster import (
    DAEMON_CONFIG,
    LOOPBACK_ENV,
    RESOURCE,
    LocalRayCluster,
    local_ray_cluster,
)

pytest.importorskip("ray.cluster_utils", reason="Ray mode needs exgen[ray]")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    started = time.monotonic()
    with local_ray_cluster(nodes=2) as test_cluster:
        print(f"ray test cluster up in {time.monotonic() - started:.1f}s")
        yield test_cluster


def start_ray_daemon(
    tmp_path: Path, cluster: LocalRayCluster, workers: int, *extra: str, ray: str = ""
) -> RunningDaemon:
    config = tmp_path / "exgen.toml"
    config.write_text(DAEMON_CONFIG)
    daemon = start_daemon(
        tmp_path,
        *("--ray", ray or cluster.address, "--config", str(config), "--workers", str(workers)),
        *("--engine", "synthetic", "--heartbeat-timeout", "5", *extra),
        env=LOOPBACK_ENV,
    )
    return daemon


def slots_of(daemon: RunningDaemon) -> dict[int, dict[str, Any]]:
    return {w["slot"]: w for w in daemon.status()["workers"]}


def test_workers_land_one_per_node_and_submit_works_unchanged(cluster, tmp_path):
    """`--ray auto` finds the cluster where Ray recorded it: in the cluster's own
    RAY_TMPDIR, not a /tmp/ray that only a machine which ran Ray before would have."""
    assert cluster.address_file.read_text().strip() == cluster.address
    daemon = start_ray_daemon(tmp_path, cluster, 2, ray="auto")
    try:
        status = daemon.wait_ready(timeout=90)
        workers = status["workers"]
        nodes = {w["node"] for w in workers}
        assert nodes == {n.node_id for n in cluster.nodes}, "one worker on each node"
        assert all(w["host"] and w["pid"] and w["state"] == "ready" for w in workers)
        ids = write_prompts(tmp_path / "in.jsonl", 300)
        submit = submit_cli(daemon.address, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
        _, stderr = submit.communicate(timeout=60)
        assert submit.returncode == 0, stderr
        records = read_output(tmp_path / "out.jsonl")
        assert_each_once_ok(records, ids)
        assert all(w["completed"] > 0 for w in slots_of(daemon).values()), "both served"
        log = daemon.log_text()
        assert "CURVE" in log and "spawn slot 0 pid" in log and " node " in log
    finally:
        assert daemon.stop() == 0
    assert "stopped" in daemon.log_text()


def test_a_slot_whose_ready_comes_before_the_placement_poll_still_shows_its_place(
    cluster, tmp_path, caplog
):
    """The daemon in this process, so the race can be made certain: the launcher's own
    placement poll is held back until the router has read the worker's READY (whose
    pid check reads the actor's facts first). Its place must still be noted, once."""
    from exgen.daemon.server import Daemon
    from exgen.daemon.supervisor import launch_ray

    caplog.set_level(logging.INFO, logger="exgen.supervisor")
    settings = Settings(
        ray=cluster.address, ray_resource=RESOURCE, ray_cpus_per_slot=0.5, workers=1,
        ray_worker_listen="tcp://127.0.0.1:0", heartbeat_timeout_s=5.0,
    )  # fmt: skip
    launch_ray.connect(cluster.address)
    daemon = None
    try:
        daemon = Daemon(settings, f"ipc://{tmp_path}/d.sock", launch_ray.plan_ray_slots(settings),
                        "synthetic", None)  # fmt: skip
        launcher = daemon.supervisor.launcher
        assert isinstance(launcher, launch_ray.RayLauncher)
        launcher.next_place_poll = math.inf  # the poll is late, as a busy loop may be
        daemon.supervisor.start_all()
        slot = daemon.supervisor.slots[0]
        turn = lambda: daemon.tick(time.monotonic()) or time.sleep(0.005)  # noqa: E731
        wait_for(lambda: turn() or slot.state == "ready", 60, "the slot ready")
        launcher.next_place_poll = 0.0  # the poll runs again
        for _ in range(20):
            turn()
        [row] = daemon.status(time.monotonic())["workers"]
        nodes = {n.node_id for n in cluster.nodes}
        assert row["state"] == "ready" and row["pid"] == slot.pid
        assert row["node"] in nodes and row["host"] == socket.gethostname()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spawn ")]
        assert lines == [f"spawn slot 0 pid {slot.pid} node {row['node'][:12]} host "
                         f"{row['host']} {RESOURCE}=1,CPU=0.5"]  # fmt: skip
    finally:
        if daemon is not None:
            daemon.shutdown()  # its launcher leaves the cluster
        else:
            import ray

            ray.shutdown()


def test_a_job_survives_kill_9_and_a_lost_node_and_the_slot_returns(cluster, tmp_path):
    # --max-attempts 1: a death that blamed the prompts on board would fail them at
    # once, so "no failure" below shows that neither death blamed any prompt.
    daemon = start_ray_daemon(
        tmp_path, cluster, 2, "--engine-opt", "token_ms=3", "--max-attempts", "1"
    )
    try:
        daemon.wait_ready(timeout=90)
        ids = write_prompts(tmp_path / "in.jsonl", 5000)
        out = tmp_path / "out.jsonl"
        submit = submit_cli(daemon.address, tmp_path / "in.jsonl", out)
        done = lambda: len(out.read_text().splitlines()) if out.exists() else 0  # noqa: E731

        wait_for(lambda: done() >= 800, 60, "800 results")
        victim = slots_of(daemon)[0]
        os.kill(victim["pid"], signal.SIGKILL)  # the worker process, on its node

        wait_for(lambda: slots_of(daemon)[0].get("pid") not in (None, victim["pid"]), 30,
                 "slot 0 restarted")  # fmt: skip
        wait_for(lambda: done() >= 2200, 60, "2200 results")
        lost = slots_of(daemon)[1]["node"]
        assert done() < 4000, "the job must still be running when the node goes"
        cluster.remove_node(lost)
        wait_for(lambda: slots_of(daemon)[1]["state"] == "pending", 30, "slot 1 pending")

        _, stderr = submit.communicate(timeout=120)
        assert submit.returncode == 0, stderr
        assert_each_once_ok(read_output(out), ids)

        new_node = cluster.add_node()
        daemon.wait_ready(timeout=60, count=2)
        back = slots_of(daemon)[1]
        assert back["state"] == "ready" and back["node"] == new_node != lost
        log = daemon.log_text()
        assert "from outside: not the OOM killer" in log
        assert f"node {lost[:12]}" in log and "left the Ray cluster" in log
    finally:
        assert daemon.stop() == 0


def test_a_slot_of_two_gpus_waits_for_a_node_that_has_two(cluster, tmp_path):
    """A multi-GPU slot is one placement-group bundle: two single-unit nodes do not
    make a place for it; it waits, pending, until a node with two units joins."""
    daemon = start_ray_daemon(tmp_path, cluster, 1, "--ray-gpus-per-slot", "2")
    big = None
    try:
        wait_for(lambda: daemon.proc.poll() is not None or _state(daemon, 0) == "pending",
                 60, "the slot pending")  # fmt: skip
        time.sleep(2)
        assert _state(daemon, 0) == "pending", "no node has two units yet"
        big = cluster.add_node(units=2)
        daemon.wait_ready(timeout=60)
        slot = slots_of(daemon)[0]
        assert slot["node"] == big and slot["devices"] == f"{RESOURCE}=2,CPU=0.5"
        with daemon.client() as client:
            [result] = client.generate(["two units"], max_new_tokens=4)
        assert result.error is None and result.text
    finally:
        assert daemon.stop() == 0
        if big is not None:
            cluster.remove_node(big)


def _state(daemon: RunningDaemon, slot: int) -> str | None:
    try:
        return str(slots_of(daemon)[slot]["state"])
    except (KeyError, errors.ExgenError):
        return None
