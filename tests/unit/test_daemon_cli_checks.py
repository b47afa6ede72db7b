"""`exgen config check` takes a file as `serve` would, listing every problem at once
(engine options included); `exgen models inspect` takes the names `models list`
prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from exgen.daemon import cli as daemon_cli
from exgen.daemon import modelstore
from exgen.daemon.engines import ENGINES


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(daemon_cli.main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_every_problem_of_a_file_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "exgen.toml"
    path.write_text(
        'engine = "synthetic"\n'
        "max_attemps = 3\n"  # unknown key
        'drain_timeout_s = "soon"\n'  # bad value
        "max_queue = 0\n"  # a rule
        "[engine_opts]\n"
        "tokn_ms = 5\n"  # unknown engine option: serve refuses it at start
        'capacity = "many"\n'  # a bad engine option value
    )
    code, _, err = run("config", "check", str(path))
    assert code == 2
    for words in (
        "unknown setting 'max_attemps'",
        "drain_timeout_s = 'soon' is not a valid value",
        "max_queue must be at least 1",
        "unknown engine option(s) tokn_ms",
        "capacity='many' is not a valid int",
        "5 problems",
    ):
        assert words in err, (words, err)


def test_a_good_file_is_ok(tmp_path: Path) -> None:
    path = tmp_path / "exgen.toml"
    path.write_text('engine = "synthetic"\n[engine_opts]\ntoken_ms = 5\n')
    code, out, _ = run("config", "check", str(path))
    assert code == 0 and "ok (2 settings)" in out


def test_every_engine_declares_where_its_options_are() -> None:
    assert set(daemon_cli.ENGINE_OPTION_SPECS) == set(ENGINES)


@pytest.mark.parametrize("name", modelstore.DEFAULT_MODEL_NAMES)
def test_models_inspect_takes_the_name_models_list_prints(name: str) -> None:
    try:
        modelstore.default_model_path()
    except modelstore.ModelNotFound:
        pytest.skip("the demo model is not installed")
    code, listed, _ = run("models", "list")
    assert code == 0 and modelstore.DEFAULT_MODEL_NAME in listed
    code, out, err = run("models", "inspect", name)
    assert code == 0, err
    assert "GGUF" in out


def test_models_inspect_of_an_unknown_name_says_what_there_is() -> None:
    code, _, err = run("models", "inspect", "no-such-model")
    assert code == 2 and "not found" in err and "available" in err


def test_serve_on_a_directory_without_weights_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A real `exgen serve` process: the user sees why, not a traceback."""
    import subprocess

    from tests.conftest import EXGEN

    empty = tmp_path / "my-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("no weights here\n")
    run_ = subprocess.run(
        [*EXGEN, "serve", "--model", str(empty), "--listen", f"ipc://{tmp_path}/s"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run_.returncode == 2, run_.stderr
    assert "Traceback" not in run_.stderr
    lines = [line for line in run_.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run_.stderr
    assert "no config.json, safetensors or .gguf found" in lines[0] and str(empty) in lines[0]
