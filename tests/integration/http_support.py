"""A real `exgen serve --http` for the HTTP tests: a free port, a state directory, and
the processes (supervisor, gateway, workers) to kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import RunningDaemon, start_daemon
from tests.netutil import free_port

SYNTHETIC = ("--engine", "synthetic", "--engine-opt", "token_ms=0")


class HttpDaemon:
    def __init__(self, daemon: RunningDaemon, url: str, state_dir: Path) -> None:
        self.daemon = daemon
        self.url = url
        self.state_dir = state_dir

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def get(self, path: str, key: str | None = None) -> tuple[int, Any]:
        return request(self.url + path, key=key)

    def post(self, path: str, body: Any, key: str | None = None) -> tuple[int, Any]:
        return request(self.url + path, body, key=key)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon.proc.poll() is not None:
                raise AssertionError(f"daemon exited:\n{self.daemon.log_text()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not healthy in {timeout}s:\n{self.daemon.log_text()}")

    def processes(self) -> list[psutil.Process]:
        """The supervisor and every process under it (gateway, workers)."""
        top = psutil.Process(self.daemon.proc.pid)
        return [top, *top.children(recursive=True)]

    def gateway_pid(self) -> int:
        for proc in self.processes()[1:]:
            with contextlib.suppress(psutil.Error):  # one just killed is a zombie a while
                if "exgen.daemon.gateway" in " ".join(proc.cmdline()):
                    return proc.pid
        raise AssertionError("no gateway process")

    def kill_all(self) -> list[psutil.Process]:
        """SIGKILL to the supervisor, the gateway and the workers, all at once."""
        procs = self.processes()
        for proc in procs:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.daemon.proc.wait(10)
        psutil.wait_procs(procs, timeout=10)
        return procs

    def stop(self) -> int:
        return self.daemon.stop()


def request(
    url: str, body: Any = None, *, key: str | None = None, method: str | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, _json(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, _json(err.read())


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def start_http_daemon(
    tmp_path: Path, *args: str, state_dir: Path | None = None, env: dict[str, str] | None = None
) -> HttpDaemon:
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    state = state_dir or tmp_path / "state"
    daemon = start_daemon(
        tmp_path, *args, "--http", f"127.0.0.1:{port}", "--http-state-dir", str(state), env=env
    )
    return HttpDaemon(daemon, f"http://127.0.0.1:{port}", state)


@contextlib.contextmanager
def demo_over_http(folder: Path, *engine_opts: str) -> Iterator[HttpDaemon]:
    """`exgen serve --http` on the demo model, one worker, ready and healthy; stopped
    cleanly after (the fixture of the e2e HTTP tests)."""
    opts = [arg for opt in engine_opts for arg in ("--engine-opt", opt)]
    daemon = start_http_daemon(folder, "--workers", "1", *opts)
    daemon.daemon.wait_ready(timeout=300)
    daemon.wait_healthy()
    yield daemon
    assert daemon.stop() == 0


def batch_lines(n: int, url: str = "/v1/chat/completions", max_tokens: int = 4) -> str:
    lines = []
    for i in range(n):
        body: dict[str, Any] = {"model": "any", "max_tokens": max_tokens}
        if url.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": f"question {i}"}]
        else:
            body["prompt"] = f"prompt {i}"
        lines.append(
            json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
        )
    return "\n".join(lines) + "\n"
