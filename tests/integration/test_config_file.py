"""The example config file and the config command line: what an operator types."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess

import pytest

from exgen.daemon import config as cfg
from tests.conftest import EXGEN, ROOT

pytestmark = pytest.mark.timeout(60)

EXAMPLE = ROOT / "systemd" / "exgen.toml"


def exgen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EXGEN_")}
    return subprocess.run(
        [*EXGEN, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**full_env, **(env or {})},
    )


def test_example_passes_config_check():
    out = exgen("config", "check", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_example_documents_every_setting():
    text = EXAMPLE.read_text()
    for field in dataclasses.fields(cfg.Settings):
        if field.name == "engine_opts":
            assert re.search(r"^\[engine_opts\]$", text, re.M)
        else:
            assert re.search(rf"^(# )?{field.name} = ", text, re.M), field.name


def test_example_loads_and_precedence_is_file_env_cli():
    from_file = cfg.load_settings(EXAMPLE, {}, environ={})
    assert from_file.listen == "ipc:///run/exgen/exgen.sock"
    assert from_file.drain_timeout_s == 60.0
    env = {"EXGEN_LOG_LEVEL": "warning", "EXGEN_DRAIN_TIMEOUT_S": "30", "EXGEN_MAX_QUEUE": "9"}
    merged = cfg.load_settings(EXAMPLE, {"log_level": "debug", "max_queue": 5}, environ=env)
    assert merged.drain_timeout_s == 30.0  # env over file
    assert merged.log_level == "debug"  # command line over env
    assert merged.max_queue == 5
    assert merged.listen == "ipc:///run/exgen/exgen.sock"  # file, untouched


def misspelt(tmp_path):
    text = EXAMPLE.read_text().replace("max_attempts = 3", "max_attemps = 3")
    path = tmp_path / "exgen.toml"
    path.write_text(text)
    return path


def test_misspelt_key_refused_by_config_check(tmp_path):
    path = misspelt(tmp_path)
    out = exgen("config", "check", str(path))
    assert out.returncode == 2
    assert f"{path}: unknown setting 'max_attemps' (did you mean 'max_attempts'?)" in out.stderr


def test_misspelt_key_refused_by_serve(tmp_path):
    path = misspelt(tmp_path)
    out = exgen("serve", "--config", str(path), "--engine", "synthetic", "--workers", "1")
    assert out.returncode == 2
    assert f"{path}: unknown setting 'max_attemps'" in out.stderr


def test_unknown_environment_setting_refused_by_serve(tmp_path):
    out = exgen("serve", "--engine", "synthetic", env={"EXGEN_WROKERS": "2"})
    assert out.returncode == 2
    assert "environment: unknown setting EXGEN_WROKERS (did you mean 'workers'?)" in out.stderr


def test_config_file_from_exgen_config_variable(tmp_path):
    path = misspelt(tmp_path)
    out = exgen("serve", "--engine", "synthetic", env={"EXGEN_CONFIG": str(path)})
    assert out.returncode == 2 and "max_attemps" in out.stderr


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = exgen(
            "serve",
            "--engine",
            "synthetic",
            "--workers",
            "1",
            "--listen",
            f"ipc://{tmp_path}/exgen.sock",
            "--metrics",
            f"127.0.0.1:{port}",
        )
    assert out.returncode == 2, out.stderr
    assert f"metrics endpoint 127.0.0.1:{port}: Address already in use" in out.stderr
