"""bench/gpu_prebuilt.py's parts that need neither torch 2.11 nor a compile: the load()
arguments read from each library's own sources (exllamav2 0.3.2 and exllamav3 1.6.5,
installed in the venv by `make setup`), the names checked, the wheel it packs."""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import importlib.util
import io
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gp() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_prebuilt

    return gpu_prebuilt


def library_root(lib: str) -> Path:
    """Where the library's sources are, found without importing it (an import would
    start its JIT build)."""
    spec = importlib.util.find_spec(lib)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{lib} is not installed (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations))).parent


def test_exllamav2s_arguments_are_its_ext_pys(gp: Any) -> None:
    args = gp.exllamav2_args(library_root("exllamav2"))
    assert args.name == "exllamav2_ext"
    assert len(args.sources) == 47 and all(Path(s).is_file() for s in args.sources)
    assert sum(s.endswith(".cu") for s in args.sources) == 28
    # ext.py's -lineinfo -O3, less the line tables and with the images compressed
    assert (args.cflags, args.cuda_cflags) == (["-Ofast"], ["-O3", "--compress-mode=size"])
    assert Path(args.include_dir, "config.h").is_file()


def test_a_changed_exllamav2_flag_stops_the_build(gp: Any, tmp_path: Path) -> None:
    src = library_root("exllamav2")
    (tmp_path / "exllamav2").mkdir()
    text = (src / "exllamav2" / "ext.py").read_text()
    assert 'extra_cuda_cflags = ["-lineinfo", "-O3"]' in text
    changed = text.replace('["-lineinfo", "-O3"]', '["-lineinfo", "-O2"]')
    (tmp_path / "exllamav2" / "ext.py").write_text(changed)
    with pytest.raises(SystemExit, match="flags are not"):
        gp.exllamav2_args(tmp_path)


def test_exllamav3s_arguments_come_from_its_own_functions(gp: Any, tmp_path: Path) -> None:
    args = gp.exllamav3_args(library_root("exllamav3"), tmp_path / "no-cuda")
    assert args.name == "exllamav3_ext"
    assert len(args.sources) > 150 and all(Path(s).is_file() for s in args.sources)
    assert not [s for s in args.sources if "/rocm/" in s], "ROCm sources in a CUDA build"
    assert {"-O3", "--use_fast_math"} <= set(args.cuda_cflags)
    assert "-lineinfo" not in args.cuda_cflags  # exllamav3 leaves it out of release builds


def test_a_changed_flag_gets_its_own_cached_wheel(gp: Any) -> None:
    args = gp.exllamav2_args(library_root("exllamav2"))
    inputs = {"torch": gp.TORCH, "arch": gp.ARCH_LIST}
    key = gp.wheel_key("exllamav2", args, inputs)
    assert key == gp.wheel_key("exllamav2", dataclasses.replace(args), dict(inputs))
    assert key != gp.wheel_key("exllamav2", dataclasses.replace(args, cuda_cflags=["-O3"]), inputs)
    assert key != gp.wheel_key("exllamav2", args, {**inputs, "arch": gp.ARCH_LIST + "+PTX"})


def test_the_names_checked_are_those_the_libraries_call(gp: Any) -> None:
    v2 = gp.names_called(library_root("exllamav2"), "exllamav2")
    assert {"gemm_half_q_half", "make_q_matrix", "rms_norm", "make_group_map"} <= v2
    # In 0.3.2 this call is commented out (moe_mlp.py), as is its binding: not asked for.
    assert "q_moe_mlp_set_loras" not in v2
    v3 = gp.names_called(library_root("exllamav3"), "exllamav3")
    assert {"hgemm", "exl3_mgemm", "rms_norm", "rope"} <= v3


def test_the_wheel_installs_the_module_at_the_top_level(gp: Any, tmp_path: Path) -> None:
    """As bench/gpu_check.py installs it on the GPU machine (there for Python 3.12)."""
    if not shutil.which("strip"):
        pytest.skip("no strip (binutils)")
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "/nonexistent")
    some_so = next(dynload.glob("_bisect.*.so"), None)  # any extension module will do
    if some_so is None:
        pytest.skip("no shared object to pack")
    module = tmp_path / "exllamav2_ext.so"
    shutil.copy(some_so, module)
    wheel = gp.make_wheel("exllamav2", module, tmp_path)
    assert wheel.name.startswith(f"exllamav2_ext-{gp.LIBRARIES['exllamav2']}+torch{gp.TORCH}.")
    assert wheel.name.endswith("-cp312-cp312-linux_x86_64.whl")
    assert_record_matches(wheel)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--target", str(target), "--python-version", "3.12", "--implementation", "cp",
         "--platform", "linux_x86_64", "--only-binary=:all:", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    installed = target / "exllamav2_ext.cpython-312-x86_64-linux-gnu.so"
    assert installed.is_file() and installed.stat().st_size <= some_so.stat().st_size


def assert_record_matches(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(zf.read(record_name).decode())))
        assert {r[0] for r in rows} == set(zf.namelist())
        for name, digest, size in rows:
            if name == record_name:
                continue
            data = zf.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={want.decode()}" and int(size) == len(data), name
