"""The library is typed for its users (PEP 561): a py.typed marker that ships."""

from __future__ import annotations

import tomllib
from pathlib import Path

import exgen.client

ROOT = Path(__file__).resolve().parents[3]


def test_the_client_package_carries_py_typed_and_ships_it():
    assert (Path(exgen.client.__file__).parent / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["exgen.client"]
