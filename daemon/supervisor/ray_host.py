"""The body of a slot's Ray actor: it starts exgen's worker process on its node.

Plain Python, no Ray import: ``launch_ray`` wraps it with ``ray.remote``, and its
tests run it as it is. The actor does nothing but hold the slot's resources and
the worker process: start it (constructor), tell where it runs (``facts``), wait
for it to end (``wait``: its exit code, and whether this node's kernel OOM-killed
anything meanwhile) and signal it. The worker is the same ``python -m
exgen.daemon.worker`` as in local mode; its CURVE key pair goes to it on stdin,
never on a command line that every user of the node can read.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from typing import Any

from exgen.daemon.supervisor.launch import oom_kill_between, read_oom_kills, worker_command


def ray_node_id() -> str:
    """This node's Ray id (imported here: only an actor, inside Ray, asks)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def ray_gpu_ids() -> list[int] | None:
    import ray

    ids = ray.get_gpu_ids()
    return [int(i) for i in ids] if ids else None


class WorkerHost:
    """One worker process on this node; its lifetime is the actor's."""

    def __init__(
        self,
        spec_json: str,
        env: dict[str, str],
        keys: tuple[str, str] | None,
        node: str | None = None,
        devices: list[int] | None = None,
    ) -> None:
        in_ray = node is None  # a test runs the host as it is, naming its "node"
        self.node = ray_node_id() if in_ray else str(node)
        self.host = socket.gethostname()
        self.devices = ray_gpu_ids() if in_ray else devices
        spec: dict[str, Any] = json.loads(spec_json)
        spec["node"] = self.node
        spec["devices"] = self.devices
        self.oom_before = read_oom_kills()
        # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPUs: the worker inherits it.
        self.popen = subprocess.Popen(
            worker_command_from(spec),
            env={**os.environ, **env},
            stdin=subprocess.PIPE if keys is not None else subprocess.DEVNULL,
            start_new_session=True,  # a signal to the actor's group is not the worker's
        )
        if keys is not None:
            assert self.popen.stdin is not None
            line = json.dumps({"public": keys[0], "secret": keys[1]})
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.close()

    def facts(self) -> dict[str, Any]:
        return {
            "pid": self.popen.pid,
            "node": self.node,
            "host": self.host,
            "devices": self.devices,
        }

    def wait(self) -> tuple[int, bool | None]:
        """Block until the worker ends: (exit code, OOM kill seen on this node)."""
        returncode = self.popen.wait()
        return returncode, oom_kill_between(self.oom_before, read_oom_kills())

    def signal(self, sig: int) -> None:
        try:
            self.popen.send_signal(signal.Signals(sig))
        except ProcessLookupError:
            pass


def worker_command_from(spec: dict[str, Any]) -> list[str]:
    """The worker's command line for a spec given as a mapping; its parent: us."""
    from exgen.daemon.worker import WorkerSpec

    return worker_command(WorkerSpec(**spec), os.getpid())
