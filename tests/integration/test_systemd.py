"""exgen under systemd: the test plays the service manager.

It owns the NOTIFY_SOCKET datagram socket, sets WATCHDOG_USEC and JOURNAL_STREAM,
and checks what systemd and the journal would see; it also runs
`systemd-analyze verify` on the unit and scrapes the metrics endpoint mid-job.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exgen.daemon import config as cfg
from tests.conftest import ROOT
from tests.netutil import free_port

pytestmark = pytest.mark.timeout(60)

UNIT = ROOT / "systemd" / "exgen.service"
SYNTHETIC = ("--engine", "synthetic", "--workers", "2")
WATCHDOG_USEC = 1_000_000  # pings expected every 0.5 s
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class NotifyListener:
    """systemd's side of sd_notify: a datagram socket and what arrived when."""

    def __init__(self, tmp_path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.name = f"@exgen-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + self.name[1:])
        else:
            self.name = str(tmp_path / "notify.sock")
            self.sock.bind(self.name)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, field: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, text in list(self.messages):
                if field in text.split("\n"):
                    return at, text
            time.sleep(0.02)
        raise AssertionError(f"no {field} in {timeout}s; got {self.messages}")

    def times(self, field: str) -> list[float]:
        return [at for at, text in list(self.messages) if field in text.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_watchdog_status_and_stopping(daemon_factory, tmp_path, abstract):
    listener = NotifyListener(tmp_path, abstract)
    env = {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        started = time.monotonic()
        daemon = daemon_factory(*SYNTHETIC, "--engine-opt", "boot_s=2", ready=False, env=env)
        ready_at, ready = listener.wait_for("READY=1", timeout=30)
        # Not before the workers finished loading (2 s), and said with the status.
        assert ready_at - started >= 2.0, listener.messages
        assert "STATUS=2/2 workers ready, 0 queued, 0 in flight" in ready.split("\n")
        assert all(w["state"] == "ready" for w in daemon.status()["workers"])
        before = [text for at, text in listener.messages if at < ready_at]
        assert "STATUS=loading models" in before
        assert any(t.startswith("STATUS=0/2 workers ready") for t in before), before
        assert any(t.startswith("EXTEND_TIMEOUT_USEC=") for t in before), before
        # systemd's variables are the supervisor's own: workers do not inherit them.
        for pid in daemon.worker_pids().values():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for v in environ)
        time.sleep(0.5)
        assert daemon.stop() == 0
        listener.wait_for("STOPPING=1", timeout=5)
        pings = listener.times("WATCHDOG=1")
    finally:
        listener.close()
    # WATCHDOG_USEC/2 apart, and never a gap that would trip systemd's watchdog.
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 4, listener.messages
    assert 0.4 <= statistics.median(gaps) <= 0.75, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    assert not listener.times("READY=1")[1:], "READY=1 sent twice"


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # verify checks that ExecStart's binary exists; /opt/exgen is not installed
    # here, so a copy points it at an executable that is.
    text = UNIT.read_text()
    assert "ExecStart=/opt/exgen/.venv/bin/exgen serve " in text
    copy = tmp_path / "exgen.service"
    copy.write_text(text.replace("/opt/exgen/.venv/bin/exgen", shutil.which("true") or "/bin/true"))
    out = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # verify exits 0 even on unknown keys or bad values, which it only prints.
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "" and out.stdout.strip() == "", out.stderr + out.stdout


def test_unit_file_settings_an_operator_relies_on():
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=mixed",
        "OOMPolicy=continue",
        "Restart=on-failure",
        "RuntimeDirectory=exgen",
        "User=exgen",
        "Environment=EXGEN_ADDRESS=ipc:///run/exgen/exgen.sock",
        "DeviceAllow=char-nvidia* rw",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ):
        assert expected in lines, expected
    assert not any(line.startswith("PrivateDevices") for line in lines)  # hides the GPUs
    watchdog = int(next(x for x in lines if x.startswith("WatchdogSec=")).split("=")[1])
    stop = int(next(x for x in lines if x.startswith("TimeoutStopSec=")).split("=")[1])
    drain = cfg.load_settings(ROOT / "systemd" / "exgen.toml", {}, environ={}).drain_timeout_s
    assert stop > drain + 5, "TimeoutStopSec must leave the drain time to finish"
    assert watchdog >= 10


def test_journald_lines_and_the_lifecycle_of_a_kill_9(daemon_factory):
    daemon = daemon_factory(*SYNTHETIC, env={"JOURNAL_STREAM": "8:12345"})
    victim = daemon.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while daemon.worker_pids().get(1) in (None, victim) and time.monotonic() < deadline:
        time.sleep(0.1)
    replacement = daemon.worker_pids()[1]
    daemon.wait_ready()
    assert daemon.stop() == 0
    lines = daemon.log_text().splitlines()
    # A priority on every line for journald, and no timestamps: the journal has them.
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), lines
    worker_lines = [line for line in lines if "exgen.worker:" in line]
    assert worker_lines and all(re.search(r": slot \d+ pid \d+: ", x) for x in worker_lines)
    expected = [
        f"<6>exgen.supervisor: spawn slot 1 pid {victim} ",
        f"<6>exgen.worker_messages: ready slot 1 pid {victim}: ",
        f"<4>exgen.supervisor: exit slot 1 pid {victim}: killed by SIGKILL",
        "<6>exgen.supervisor: restart slot 1 ",
        f"<6>exgen.supervisor: spawn slot 1 pid {replacement} ",
        f"<6>exgen.worker_messages: ready slot 1 pid {replacement}: ",
        "<6>exgen.daemon: drain: ",
        "<6>exgen.daemon: stopped",
    ]
    assert_in_order(lines, expected)


def assert_in_order(lines: list[str], prefixes: list[str]) -> None:
    at = 0
    for prefix in prefixes:
        found = next((i for i in range(at, len(lines)) if lines[i].startswith(prefix)), None)
        assert found is not None, f"no line {prefix!r} after line {at}:\n" + "\n".join(lines)
        at = found + 1


def scrape(url: str) -> Metrics:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_until(url: str, done: Callable[[Metrics], bool], timeout: float = 5.0) -> Metrics:
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(url)
        if done(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def total(metrics: Metrics, name: str) -> float:
    return sum(value for (metric, _), value in metrics.items() if metric == name)


def test_metrics_move_during_a_job(daemon_factory):
    port = free_port()
    daemon = daemon_factory(
        *SYNTHETIC,
        "--engine-opt",
        "token_ms=5",
        "--metrics",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
    )
    url = f"http://127.0.0.1:{port}/metrics"
    ready = ("exgen_worker_state", (("slot", "0"), ("state", "ready")))
    first = scrape_until(url, lambda m: m.get(ready) == 1.0)  # refreshed once a second
    assert ("exgen_worker_load_seconds", (("slot", "1"),)) in first
    items = [{"id": f"m{i}", "prompt": f"metrics {i}"} for i in range(600)]
    during = []
    with daemon.client() as client:
        for n, _ in enumerate(client.iter_results(items, max_new_tokens=20), 1):
            if n % 150 == 0 and n < 600:
                during.append(scrape(url))
    completed = [total(m, "exgen_prompts_completed_total") for m in during]
    assert completed == sorted(completed) and completed[-1] > completed[0], completed
    assert any(total(m, "exgen_queue_length") + total(m, "exgen_inflight") > 0 for m in during)
    # Within a second or two of the end, everything is counted.
    last = scrape_until(
        url,
        lambda m: (
            total(m, "exgen_request_latency_seconds_count") == 600
            and total(m, "exgen_worker_tokens_total") >= 600 * 20
        ),
    )
    assert total(last, "exgen_prompts_completed_total") == 600
    assert total(last, "exgen_worker_prompts_completed_total") == 600
    assert total(last, "exgen_request_latency_seconds_count") == 600
    assert total(last, "exgen_worker_tokens_total") == 600 * 20
    assert total(last, "exgen_worker_prompts_failed_total") == 0
    assert total(last, "exgen_queue_length") == 0
    # --log-level warning: a quiet run leaves no info lines.
    assert daemon.stop() == 0
    assert " INFO " not in daemon.log_text(), daemon.log_text()
