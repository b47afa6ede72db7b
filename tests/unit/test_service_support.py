"""The pieces behind running as a service, without processes: sd_notify, journald
log lines, metrics snapshots, and the checks on settings."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import urllib.request

import pytest

from exgen.daemon import config as cfg
from exgen.daemon.logs import _Formatter
from exgen.daemon.metrics import LATENCY_BUCKETS, Metrics
from exgen.daemon.supervisor.sdnotify import Notifier

# --- sd_notify ---------------------------------------------------------------------


def test_notifier_does_nothing_without_a_socket():
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    notifier.notify("READY=1")  # no error, no socket
    assert notifier.sock is None


def test_notifier_abstract_address_and_watchdog_interval():
    notifier = Notifier({"NOTIFY_SOCKET": "@x/y", "WATCHDOG_USEC": "3000000"})
    assert notifier.address == "\0x/y"
    assert notifier.watchdog_interval_s == 1.5


def test_watchdog_meant_for_another_pid_is_ignored():
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval_s is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier(env).watchdog_interval_s == 1.5


def test_notifier_takes_its_variables_out_of_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "n.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = Notifier()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    notifier.notify("READY=1", "STATUS=ok")
    assert receiver.recv(100) == b"READY=1\nSTATUS=ok"
    notifier.close()
    receiver.close()


def test_a_missing_notify_socket_is_a_warning_once(caplog):
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    with caplog.at_level(logging.DEBUG, logger="exgen.daemon.supervisor.sdnotify"):
        for _ in range(3):
            notifier.notify("WATCHDOG=1")
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    notifier.close()


# --- log lines ---------------------------------------------------------------------


def record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("exgen.worker", level, __file__, 1, message, None, exc_info)


def test_journald_lines_have_a_priority_on_every_line_and_no_time():
    formatter = _Formatter(journald=True, prefix="slot 2 pid 77")
    assert formatter.format(record(logging.INFO, "ready")) == (
        "<6>exgen.worker: slot 2 pid 77: ready"
    )
    text = formatter.format(record(logging.ERROR, "failed", exc=True))
    lines = text.split("\n")
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert formatter.format(record(logging.WARNING, "x")).startswith("<4>")


def test_terminal_lines_have_time_and_level():
    line = _Formatter(journald=False, prefix="").format(record(logging.WARNING, "hello"))
    assert re.match(r"\d\d:\d\d:\d\d WARNING exgen.worker: hello$", line), line


# --- metrics -------------------------------------------------------------------------


def status(completed: int, state: str = "ready", load_s: float | None = 1.5) -> dict:
    worker = {
        "slot": 0,
        "state": state,
        "tokens": completed * 10,
        "completed": completed,
        "failed": 1,
        "inflight": 3,
        "restarts": 2,
    }
    if load_s is not None:
        worker["load_s"] = load_s
    return {
        "workers": [worker],
        "queued": 7,
        "inflight": 3,
        "completed": completed,
        "failed": 1,
        "hedges": {"copies": 5, "won": 2},
        "draining": False,
        "engine": "synthetic",
        "model": "m",
        "instance": "i",
    }


def collect(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }


def test_metrics_snapshot_and_latency_histogram():
    metrics = Metrics("127.0.0.1", 0)
    metrics.latencies.extend([0.05, 0.1, 0.3, 7200.0])
    metrics.refresh(status(5))
    assert metrics.latencies == []  # folded
    got = collect(metrics)
    assert got[("exgen_worker_prompts_completed_total", (("slot", "0"),))] == 5
    assert got[("exgen_worker_tokens_total", (("slot", "0"),))] == 50
    assert got[("exgen_worker_restarts_total", (("slot", "0"),))] == 2
    assert got[("exgen_worker_state", (("slot", "0"), ("state", "ready")))] == 1
    assert got[("exgen_worker_state", (("slot", "0"), ("state", "starting")))] == 0
    assert got[("exgen_queue_length", ())] == 7
    assert got[("exgen_hedge_copies_total", ())] == 5
    assert got[("exgen_hedge_won_total", ())] == 2
    assert got[("exgen_request_latency_seconds_bucket", (("le", "0.1"),))] == 2  # le: inclusive
    assert got[("exgen_request_latency_seconds_bucket", (("le", "0.5"),))] == 3
    assert got[("exgen_request_latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert got[("exgen_request_latency_seconds_count", ())] == 4
    # A restarting slot keeps its last load time; counts accumulate across refreshes.
    metrics.latencies.append(1.0)
    metrics.refresh(status(9, state="restarting", load_s=None))
    got = collect(metrics)
    assert got[("exgen_worker_load_seconds", (("slot", "0"),))] == 1.5
    assert got[("exgen_request_latency_seconds_count", ())] == 5
    assert len(LATENCY_BUCKETS) == len(metrics.snapshot.latency_buckets)


def test_metrics_endpoint_serves_its_own_registry_only():
    metrics = Metrics("127.0.0.1", 0)
    url = metrics.start()
    try:
        metrics.refresh(status(1))
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.close()
    assert "exgen_prompts_completed_total 1.0" in body
    assert "python_gc_objects_collected_total" not in body  # the global registry's


# --- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_metrics_listen(text, expected):
    assert cfg.parse_metrics_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:port", "1.2.3.4:70000", "[::1]"])
def test_metrics_listen_refused(text):
    with pytest.raises(cfg.ConfigError, match="metrics_listen"):
        cfg.parse_metrics_listen(text)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('engine = "exl2"', "engine = 'exl2'"),
        ('log_level = "verbose"', "log_level"),
        ('listen = "http://x"', "listen"),
        ("listen = 5", "expected a string"),
        ("workers = 2.5", "whole number"),
        ("drain_timeout_s = -1", "drain_timeout_s"),
        ("heartbeat_timeout_s = 0.5", "heartbeat_timeout_s"),
        ('metrics_listen = "x:y"', "metrics_listen"),
        ("min_ready = 0", "min_ready"),
        ("[engine_opts.nested]\na = 1", "engine_opts.nested"),
    ],
)
def test_bad_values_are_named(tmp_path, toml, message):
    path = tmp_path / "exgen.toml"
    path.write_text(toml + "\n")
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.load_settings(path, {}, environ={})


def test_misspelt_key_gets_a_suggestion(tmp_path):
    path = tmp_path / "exgen.toml"
    path.write_text("drain_timeout = 5\n")
    with pytest.raises(cfg.ConfigError, match=r"did you mean 'drain_timeout_s'"):
        cfg.load_settings(path, {}, environ={})


def test_toml_forms_of_gpus_and_engine_opts(tmp_path):
    path = tmp_path / "exgen.toml"
    path.write_text("gpus = [[0, 1], [2, 3]]\n[engine_opts]\ntp = true\nmax_batch_size = 16\n")
    settings = cfg.load_settings(path, {}, environ={})
    assert settings.gpus == "0,1;2,3"
    assert settings.engine_opts == {"tp": "true", "max_batch_size": "16"}


def test_exgen_listen_wins_over_exgen_address():
    env = {"EXGEN_LISTEN": "ipc:///a.sock", "EXGEN_ADDRESS": "ipc:///b.sock"}
    assert cfg.load_settings(None, {}, environ=env).listen == "ipc:///a.sock"
