"""Ray's own test cluster on this machine (``ray.cluster_utils.Cluster``), for the Ray
mode tests and bench/ray_mode.py: a head without slot resources, and nodes with a
custom resource standing in for GPUs.

Everything stays on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray bind and
advertise 127.0.0.1), the cluster's files live in a private temp dir, and
``shutdown`` stops every process it started. That dir is also RAY_TMPDIR: Ray writes
the head's address to ``<RAY_TMPDIR>/ray/ray_current_cluster`` whatever the head's own
``temp_dir``, and a machine that never ran Ray has no ``/tmp/ray`` for it (a run that
left one there hid this: every cluster test failed on a fresh machine).
``fast_health_checks`` declares a lost node dead in about 0.6 s (200 ms × 3); Ray's
defaults take ~15 s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 200,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}
RESOURCE = "fake_gpu"
# exgen.toml for a daemon on this cluster: workers dial back on loopback.
DAEMON_CONFIG = f"""
[ray]
resource = "{RESOURCE}"
cpus_per_slot = 0.5
worker_listen = "tcp://127.0.0.1:0"
"""


class LocalRayCluster:
    """Made inside ``local_ray_cluster``, which points RAY_TMPDIR at ``temp_dir``."""

    def __init__(self, temp_dir: str, fast_health_checks: bool = True) -> None:
        from ray import cluster_utils

        self.temp_dir = temp_dir
        os.makedirs(self.address_file.parent, exist_ok=True)
        head: dict[str, Any] = {
            "num_cpus": 0,
            "temp_dir": self.temp_dir,
            "include_dashboard": False,
        }
        if fast_health_checks:
            head["_system_config"] = FAST_HEALTH_CHECKS
        self.cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=head)
        self.nodes: list[Any] = []

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def address_file(self) -> Path:
        """Where Ray records the head's address (as `ray start` does)."""
        return Path(self.temp_dir) / "ray" / "ray_current_cluster"

    def add_node(self, units: int = 1) -> str:
        node = self.cluster.add_node(num_cpus=1, resources={RESOURCE: units})
        self.cluster.wait_for_nodes()
        self.nodes.append(node)
        return str(node.node_id)

    def remove_node(self, node_id: str) -> None:
        """The node goes without warning: raylet and its processes SIGKILLed."""
        node = next(n for n in self.nodes if n.node_id == node_id)
        self.nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def local_ray_cluster(nodes: int = 2, fast_health_checks: bool = True) -> Iterator[LocalRayCluster]:
    """A cluster of ``nodes`` one-unit nodes, on loopback, shut down whatever happens."""
    temp_dir = tempfile.mkdtemp(prefix="exray-")  # short: Ray's socket paths
    env = {**LOOPBACK_ENV, "RAY_TMPDIR": temp_dir}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = None
    try:
        cluster = LocalRayCluster(temp_dir, fast_health_checks)
        for _ in range(nodes):
            cluster.add_node()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
