"""Ray mode's settings and start-up refusals, and the promise that nothing
outside Ray mode imports ray."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from exgen.daemon import cli as daemon_cli
from exgen.daemon import config as cfg


def test_a_ray_table_in_the_file_sets_the_ray_settings(tmp_path: Path) -> None:
    path = tmp_path / "exgen.toml"
    path.write_text(
        'engine = "synthetic"\n'
        "[ray]\n"
        'address = "auto"\n'
        'resource = "A100"\n'
        "gpus_per_slot = 2\n"
        'worker_listen = "tcp://10.0.0.5:7000"\n'
    )
    settings = cfg.load_settings(path, {}, environ={})
    assert settings.ray == "auto" and settings.ray_resource == "A100"
    assert settings.ray_gpus_per_slot == 2
    assert settings.ray_worker_listen == "tcp://10.0.0.5:7000"


def test_ray_flat_in_the_file_and_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "exgen.toml"
    path.write_text('ray = "10.0.0.1:6379"\n')
    env = {"EXGEN_RAY_RESOURCE": "fake_gpu", "EXGEN_RAY_CPUS_PER_SLOT": "0.5"}
    settings = cfg.load_settings(path, {}, environ=env)
    assert settings.ray == "10.0.0.1:6379" and settings.ray_resource == "fake_gpu"
    assert settings.ray_cpus_per_slot == 0.5


def test_a_misspelt_key_in_the_ray_table_is_named(tmp_path: Path) -> None:
    path = tmp_path / "exgen.toml"
    path.write_text('[ray]\nresorce = "GPU"\n')
    with pytest.raises(cfg.ConfigError, match=r"ray_resorce.*did you mean 'ray_resource'"):
        cfg.load_settings(path, {}, environ={})


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"gpus": "0,1"}, "in Ray mode Ray places the slots"),
        ({"ray_worker_listen": "ipc:///tmp/x"}, "expected tcp://HOST:PORT"),
        ({"ray_gpus_per_slot": 0, "ray_cpus_per_slot": 0}, "a slot must take something"),
        ({"ray_gpus_per_slot": -1}, "0 or more"),
        ({"ray": " "}, "give \"auto\""),
    ],
)
def test_ray_settings_that_cannot_work_are_refused(changes: dict, words: str) -> None:
    settings = cfg.Settings(ray="auto").replace(**changes)
    with pytest.raises(cfg.ConfigError, match=words):
        cfg.check_settings(settings)


def test_gpus_without_ray_are_still_fine() -> None:
    cfg.check_settings(cfg.Settings(gpus="0,1"))


def serve(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(daemon_cli.main, ["serve", *args])
    return result.exit_code, result.output


def test_serve_ray_alone_means_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(settings: cfg.Settings) -> int:
        seen["ray"] = settings.ray
        return 0

    monkeypatch.setattr(daemon_cli, "run_daemon", fake_run)
    monkeypatch.delenv("EXGEN_RAY", raising=False)
    assert serve("--engine", "synthetic", "--ray")[0] == 0 and seen["ray"] == "auto"
    assert serve("--engine", "synthetic", "--ray", "h:6379")[0] == 0 and seen["ray"] == "h:6379"
    assert serve("--engine", "synthetic")[0] == 0 and seen["ray"] is None


def test_serve_ray_where_no_cluster_answers_says_so_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray mode needs exgen[ray]")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, output = serve(
        "--engine", "synthetic", "--workers", "1", "--ray", f"127.0.0.1:{port}",
        "--listen", f"ipc://{tmp_path}/x.sock",
    )  # fmt: skip
    assert code == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in output
    assert "ray start --head" in output


def test_nothing_outside_ray_mode_imports_ray() -> None:
    code = (
        "import sys\n"
        "import exgen.client.cli, exgen.daemon.cli, exgen.daemon.server\n"
        "import exgen.daemon.supervisor.supervisor, exgen.daemon.supervisor.launch\n"
        "import exgen.daemon.supervisor.ray_host\n"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
