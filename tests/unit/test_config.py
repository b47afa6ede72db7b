"""Settings: file < environment < command line; unknown keys named."""

from __future__ import annotations

from pathlib import Path

import pytest

from exgen.daemon import config as cfg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exgen.toml"
    path.write_text(text)
    return path


def test_precedence_file_env_cli(tmp_path):
    path = write(tmp_path, 'engine = "synthetic"\nworkers = 2\nmax_queue = 10\n')
    env = {"EXGEN_WORKERS": "3", "EXGEN_MAX_QUEUE": "20"}
    settings = cfg.load_settings(path, {"workers": 4}, environ=env)
    assert settings.engine == "synthetic"
    assert settings.max_queue == 20
    assert settings.workers == 4


def test_unknown_key_in_file_is_named_with_the_file(tmp_path):
    path = write(tmp_path, 'engnie = "synthetic"\n')
    with pytest.raises(cfg.ConfigError, match=r"exgen.toml: unknown setting 'engnie'"):
        cfg.load_settings(path, {}, environ={})


def test_unknown_environment_setting_is_named():
    with pytest.raises(cfg.ConfigError, match="EXGEN_WROKERS"):
        cfg.load_settings(None, {}, environ={"EXGEN_WROKERS": "2"})


def test_bad_value_is_named(tmp_path):
    path = write(tmp_path, 'max_queue = "lots"\n')
    with pytest.raises(cfg.ConfigError, match="max_queue"):
        cfg.load_settings(path, {}, environ={})


def test_engine_opts_merge_file_then_cli(tmp_path):
    path = write(tmp_path, "[engine_opts]\ntoken_ms = 5\ncapacity = 4\n")
    settings = cfg.load_settings(path, {"engine_opts": {"capacity": "16"}}, environ={})
    assert settings.engine_opts == {"token_ms": "5", "capacity": "16"}


def test_exgen_address_is_the_default_listen_address():
    settings = cfg.load_settings(None, {}, environ={"EXGEN_ADDRESS": "ipc:///tmp/x.sock"})
    assert settings.listen == "ipc:///tmp/x.sock"


@pytest.mark.parametrize(
    ("spec", "slots"),
    [
        ("0,1,2,3", [[0], [1], [2], [3]]),
        ("0,1;2,3", [[0, 1], [2, 3]]),
        ("4", [[4]]),
        ("0,1;2", [[0, 1], [2]]),
        ("0;0", [[0], [0]]),  # two replicas on one card, said so with ';'
        ("0,1;0,1", [[0, 1], [0, 1]]),
    ],
)
def test_parse_gpus(spec, slots):
    assert cfg.parse_gpus(spec) == slots


@pytest.mark.parametrize("spec", ["", "a,b", "0,0", "0;0,1", "0,0;1", "-1"])
def test_parse_gpus_refuses_nonsense(spec):
    with pytest.raises(cfg.ConfigError):
        cfg.parse_gpus(spec)


def test_gpus_and_workers_together_are_refused():
    with pytest.raises(cfg.ConfigError, match="either gpus or workers"):
        cfg.load_settings(None, {"gpus": "0", "workers": 2}, environ={})


def test_engine_opt_pairs():
    assert cfg.parse_engine_opts(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(cfg.ConfigError, match="KEY=VALUE"):
        cfg.parse_engine_opts(["novalue"])


@pytest.mark.parametrize(
    "variable", ["EXGEN_CACHE_DIR", "EXGEN_MODELS_DIR", "EXGEN_SERVER_KEY", "EXGEN_CLIENT_KEY"]
)
def test_our_other_environment_variables_are_not_refused_as_settings(variable):
    # They are read elsewhere (model store, cache, the client's keys): `exgen serve`
    # must start with them exported in the same shell.
    cfg.load_settings(None, {}, environ={variable: "/somewhere"})
