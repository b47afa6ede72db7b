"""Prebuilt exllamav2/v3 CUDA extensions for the lent GPU machine, built on a CPU one.

The exllamav2 and exllamav3 wheels on PyPI are pure Python: at import they compile
their CUDA extension with torch's JIT loader (``torch.utils.cpp_extension.load``),
which on the GPU machine costs minutes of a budget counted in minutes. Both skip that
build when a top-level module ``exllamav2_ext`` / ``exllamav3_ext`` is importable
(exllamav2/ext.py: ``import exllamav2_ext``; exllamav3/ext.py:
``is_precompiled_extension_available``). This script builds those modules here, for
the machine's Python 3.12 and torch 2.11.0+cu130 on sm_90, entirely from PyPI wheels:

- a Python 3.12 venv (pyenv's, headers included) with torch 2.11.0 and the CUDA 13
  wheels torch pins (``cuda-toolkit==…`` in its metadata) plus that toolkit's nvcc,
  crt, nvvm and cccl parts: nvcc, and the cudart/cublas/cusparse/curand headers and
  libraries the sources include and link against;
- the compile itself is torch's own ``load()``, called with the arguments each
  library's ext.py passes it, so the flags, defines and ABI are what the JIT on the
  GPU machine would use; ``TORCH_CUDA_ARCH_LIST`` stands in for the GPU it lacks;
- each module, stripped, goes into a wheel that ``pip install --no-index --no-deps
  --target`` installs (bench/gpu_check.py does), copied to ``.whl/``.

Everything is cached: the downloads and the venv under ``~/.cache/exgen/gpu-prebuilt``,
the wheels under a key of every input (versions, arch, flags, compiler, this file), so
a rerun with nothing changed copies two files. ``--check`` installs the wheels into a
throwaway target and imports them beside torch 2.11 under Python 3.12 (no GPU needed),
then compares the module's functions with the names the library's Python calls.

    python3 bench/gpu_prebuilt.py            # build (or take from the cache) into .whl/
    python3 bench/gpu_prebuilt.py --check    # and check the wheels load

The standard library only: it runs under any Python 3.11+, and runs the steps that
need torch under the venv's Python 3.12 (``_compile``, ``_probe``).
"""

from __future__ import annotations

import argparse
import ast
import base64
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
WHEELS = ROOT / ".whl"
CACHE = Path(os.environ.get("EXGEN_CACHE", Path.home() / ".cache" / "exgen")) / "gpu-prebuilt"

# The GPU machine's stack (docs/gpus.md): the wheels are built for it and nothing else.
TORCH = "2.11.0"
CUDA_TOOLKIT = "13.0.2"  # torch 2.11.0's pin (checked against its metadata below)
CUDA_TAG = "cu130"
PYTHON_TAG = "cp312"
# H100 and H200: sm_90 code only. The JIT there would add the PTX ("9.0+PTX"), which
# only a GPU newer than sm_90 would run, and which is most of the kernels' size
# (compressed: exllamav2 4.1 of 6.2 MiB, an exllamav3 GEMM unit 0.3 of 0.5): with it,
# exllamav3 alone would be about the 64 MiB a device run carries.
ARCH_LIST = os.environ.get("GPU_PREBUILT_ARCH", "9.0")
LIBRARIES = {"exllamav2": "0.3.2", "exllamav3": "1.6.5"}
JOBS = int(os.environ.get("GPU_PREBUILT_JOBS", "2"))  # exllamav3's bindings.cpp alone wants ~3.7 GB
NICE = 10  # the machine is shared: the compile yields to tests


def log(msg: str) -> None:
    print(f"gpu-prebuilt: {msg}", flush=True)


# --------------------------------------------------------------------------- inputs


def find_python312() -> Path:
    """pyenv's 3.12 (which ships its headers), or GPU_PREBUILT_PYTHON."""
    if env := os.environ.get("GPU_PREBUILT_PYTHON"):
        return Path(env)
    for cand in sorted(Path.home().glob(".pyenv/versions/3.12.*/bin/python3.12")):
        return cand
    found = shutil.which("python3.12")
    if not found:
        raise SystemExit("gpu-prebuilt: no Python 3.12 (set GPU_PREBUILT_PYTHON)")
    return Path(found)


def tool_version(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[0]


def build_inputs(python: Path) -> dict[str, str]:
    """Every input that changes the built modules besides each library's load() arguments
    (wheel_key adds those); the wheels are cached under their hash."""
    inputs = {
        "libraries": json.dumps(LIBRARIES, sort_keys=True),
        "torch": TORCH,
        "cuda_toolkit": CUDA_TOOLKIT,
        "python": tool_version([str(python), "--version"]),
        "arch": ARCH_LIST,
        "gcc": tool_version(["gcc", "--version"]),
        "script": hashlib.sha256(HERE.read_bytes()).hexdigest(),
    }
    return inputs


# ------------------------------------------------------------------------ toolchain


def toolchain_pins() -> list[str]:
    # The nvcc parts are extras of the same cuda-toolkit release torch pins, so the
    # compiler is the one torch was built against. The libraries themselves (with their
    # requirements) are there for the check, which imports each through its own loader.
    return [f"torch=={TORCH}", f"cuda-toolkit[nvcc,crt,nvvm,cccl]=={CUDA_TOOLKIT}",
            *(f"{lib}=={ver}" for lib, ver in LIBRARIES.items())]


def ensure_venv(python: Path) -> Path:
    """A Python 3.12 venv with torch and the CUDA wheels: downloaded once, installed once."""
    pins = toolchain_pins()
    tag = hashlib.sha256(json.dumps([str(python), pins]).encode()).hexdigest()[:12]
    venv = CACHE / f"venv-{tag}"
    stamp = venv / ".exgen-ready"
    if stamp.exists():
        return venv
    downloads = CACHE / "dl"
    downloads.mkdir(parents=True, exist_ok=True)
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check"]
    log(f"downloading {' '.join(pins)} and their dependencies (~5 GB, once) to {downloads}")
    # Two steps, so a rebuild of the venv needs no network.
    subprocess.run([*pip, "download", "-d", str(downloads), *pins], check=True)
    subprocess.run([*pip, "install", "--no-index", "--find-links", str(downloads), *pins],
                   check=True)
    check_torch_pin(venv)
    stamp.write_text(json.dumps(pins))
    return venv


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3.*/site-packages"))


def check_torch_pin(venv: Path) -> None:
    meta = next(site_packages(venv).glob(f"torch-{TORCH}*.dist-info")) / "METADATA"
    pin = next((ln for ln in meta.read_text().splitlines() if "cuda-toolkit[" in ln), "")
    if f"=={CUDA_TOOLKIT}" not in pin:
        raise SystemExit(f"gpu-prebuilt: torch {TORCH} pins {pin!r}, "
                         f"not cuda-toolkit=={CUDA_TOOLKIT}")


def ensure_cuda_home(venv: Path) -> Path:
    """A CUDA_HOME over the wheels' nvidia/cu13 tree, the layout torch's loader expects.

    The wheels ship ``libcudart.so.13`` only; the link line asks for ``-lcudart``.
    """
    cu13 = site_packages(venv) / "nvidia" / "cu13"
    home = venv / "cuda-home"
    if (home / "bin" / "nvcc").exists():
        return home
    home.mkdir(exist_ok=True)
    for part in ("bin", "include", "nvvm"):
        link = home / part
        if not link.exists():
            link.symlink_to(cu13 / part)
    lib = home / "lib64"
    lib.mkdir(exist_ok=True)
    for so in (cu13 / "lib").iterdir():
        if not (lib / so.name).exists():
            (lib / so.name).symlink_to(so)
        unversioned = lib / re.sub(r"\.so\.\d+$", ".so", so.name)
        if unversioned != lib / so.name and not unversioned.exists():
            unversioned.symlink_to(so)
    return home


def library_sources(name: str) -> Path:
    """The library's wheel, unpacked: its extension sources and its ext.py."""
    dest = CACHE / "src" / f"{name}-{LIBRARIES[name]}"
    if not (dest / name / "ext.py").exists():
        wheel = next((CACHE / "dl").glob(f"{name}-{LIBRARIES[name]}-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)
    return dest


# ----------------------------------------------------------------- each library's args


@dataclass(frozen=True)
class LoadArgs:
    """The arguments the library's ext.py passes to torch's load() on Linux with CUDA."""

    name: str  # the module: exllamav2_ext
    sources: list[str]
    include_dir: str
    cflags: list[str]
    cuda_cflags: list[str]
    ldflags: list[str]


def exllamav2_args(src: Path) -> LoadArgs:
    """exllamav2/ext.py keeps its list of sources and its flags inline.

    The flags are read from the Linux branch of ext.py as literals; a release that
    changes them fails here rather than building with stale ones.
    """
    text = (src / "exllamav2" / "ext.py").read_text()
    tree = ast.parse(text)
    literal: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and isinstance(node.value, ast.List):
                with_value = literal.setdefault(target.id, [])
                with_value.append(ast.literal_eval(node.value))
    cflags = ["-Ofast"]
    cuda_cflags = ["-lineinfo", "-O3"]
    if cflags not in literal["extra_cflags"] or cuda_cflags not in literal["extra_cuda_cflags"]:
        raise SystemExit(f"gpu-prebuilt: exllamav2/ext.py flags are not {cflags} / {cuda_cflags}")
    sources_dir = src / "exllamav2" / "exllamav2_ext"
    (sources,) = literal["sources_"]
    return LoadArgs("exllamav2_ext", [str(sources_dir / s) for s in sources], str(sources_dir),
                    cflags, shrink_kernels(cuda_cflags), [])


def shrink_kernels(cuda_cflags: list[str]) -> list[str]:
    """exllamav2's nvcc flags as exllamav3 sets its own, for a device run's 64 MiB: no
    source line tables (-lineinfo: for profilers and debuggers; with them the module
    was 50 MB, 37 MiB of it sm_90 code), kernel images compressed (--compress-mode,
    nvcc 12.8+). Neither changes the generated code."""
    return [f for f in cuda_cflags if f != "-lineinfo"] + ["--compress-mode=size"]


def exllamav3_args(src: Path, cuda_home: Path) -> LoadArgs:
    """exllamav3 exposes its sources and nvcc flags as functions (util/cuda_flags.py,
    standard library only, which its own setup.py loads by path the same way)."""
    spec = importlib.util.spec_from_file_location(
        "exllamav3_cuda_flags", src / "exllamav3" / "util" / "cuda_flags.py")
    assert spec and spec.loader
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    sources_dir = src / "exllamav3" / "exllamav3_ext"
    return LoadArgs(
        "exllamav3_ext",
        flags.extension_sources(str(sources_dir), hip=False),
        str(sources_dir),
        ["-Ofast"],  # ext.py, the non-Windows, non-ROCm branch
        flags.cuda_cflags(cuda_home=str(cuda_home), debug=False, hip=False),
        [],
    )


def load_args(name: str, cuda_home: Path) -> LoadArgs:
    src = library_sources(name)
    if name == "exllamav2":
        return exllamav2_args(src)
    return exllamav3_args(src, cuda_home)


# -------------------------------------------------------------------------- compile


def compile_in_venv(venv: Path, cuda_home: Path, args: LoadArgs, build_dir: Path) -> dict[str, Any]:
    """torch's load() under the venv's Python, niced, at JOBS compiles at once.

    Returns the wall and CPU seconds (the compilers included) and the built module's
    path; raises with the log's tail when the build fails.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "exgen-build.lock", "w") as ours:
        try:
            fcntl.flock(ours, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"gpu-prebuilt: another build is running in {build_dir}") from None
        # Ours is held, so torch's own lock file there is a stale one, left by a build
        # that was killed: load() would wait for it for ever.
        (build_dir / "lock").unlink(missing_ok=True)
        return _compile_locked(venv, cuda_home, args, build_dir)


def _compile_locked(venv: Path, cuda_home: Path, args: LoadArgs, build_dir: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "CUDA_HOME": str(cuda_home),
        "TORCH_CUDA_ARCH_LIST": ARCH_LIST,
        "MAX_JOBS": str(JOBS),
        "PYTHONUNBUFFERED": "1",
    }
    spec = json.dumps(args.__dict__)
    logfile = build_dir / "build.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with logfile.open("w") as out:
        proc = subprocess.run(
            ["nice", "-n", str(NICE), str(venv / "bin" / "python"), str(HERE), "_compile", spec,
             str(build_dir)], stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    module = build_dir / f"{args.name}.so"
    if proc.returncode != 0 or not module.exists():
        failed = sorted(set(re.findall(r"^FAILED: (\S+)", logfile.read_text(), re.M)))
        tail = logfile.read_text()[-3000:]
        raise BuildError(f"{args.name}: build failed (rc {proc.returncode}); failed units: "
                         f"{', '.join(failed) or 'none named'}; log {logfile}\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # ninja numbers the steps it runs, "[3/29]": the units it compiled (and the link);
    # none when everything was up to date.
    steps = re.findall(r"^\[\d+/(\d+)\]", logfile.read_text(errors="replace"), re.M)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "module": str(module),
            "ninja_steps": int(steps[-1]) if steps else 0}


class BuildError(RuntimeError):
    pass


def run_compile(spec_json: str, build_dir: str) -> int:
    """Under the venv: the library's own load() call, with a build directory of ours.

    load() imports the module once it is linked; on a machine without CUDA that import
    may fail (the check step imports it properly), which does not fail the build.
    """
    import torch.utils.cpp_extension as cpp_extension

    spec = json.loads(spec_json)
    try:
        cpp_extension.load(
            name=spec["name"],
            sources=spec["sources"],
            extra_include_paths=[spec["include_dir"]],
            extra_cflags=spec["cflags"],
            extra_cuda_cflags=spec["cuda_cflags"],
            extra_ldflags=spec["ldflags"],
            build_directory=build_dir,
            verbose=True,
        )
    except ImportError as exc:
        print(f"gpu-prebuilt: built; the import after the build failed here: {exc}")
    return 0



def build_dir(lib: str) -> Path:
    """Where ninja keeps the library's objects, one per library version and toolchain:
    ninja recompiles a unit whose command line changed (a flag, the arch list) and
    keeps the rest, and an interrupted build resumes."""
    return CACHE / "build" / f"{lib}-{LIBRARIES[lib]}-torch{TORCH}-cuda{CUDA_TOOLKIT}"


# -------------------------------------------------------------------------- package


def wheel_version(lib: str) -> str:
    """The library's version, with what the module is bound to as the local label."""
    sm = ARCH_LIST.split("+")[0].replace(".", "").replace(";", ".sm")
    return f"{LIBRARIES[lib]}+torch{TORCH}.{CUDA_TAG}.sm{sm}"


def record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def make_wheel(lib: str, module: Path, dest: Path) -> Path:
    """A wheel holding the stripped module as a top-level extension, which is where
    both libraries look for it."""
    name = f"{lib}_ext"
    version = wheel_version(lib)
    tag = f"{PYTHON_TAG}-{PYTHON_TAG}-linux_x86_64"
    stripped = dest / f"{name}.stripped.so"
    # Debug symbols only: the kernels live in .nv_fatbin, which strip keeps.
    subprocess.run(["strip", "--strip-debug", "--strip-unneeded", "-o", str(stripped), str(module)],
                   check=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.cpython-312-x86_64-linux-gnu.so": stripped.read_bytes(),
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                             f"Summary: {lib} {LIBRARIES[lib]}'s CUDA extension, prebuilt by "
                             f"exgen's bench/gpu_prebuilt.py for torch {TORCH}+{CUDA_TAG}, "
                             f"arch {ARCH_LIST}\n").encode(),
        f"{info}/WHEEL": (f"Wheel-Version: 1.0\nGenerator: exgen gpu_prebuilt\n"
                          f"Root-Is-Purelib: false\nTag: {tag}\n").encode(),
    }
    stripped.unlink()
    record = [record_line(arc, data) for arc, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
    return wheel


# ---------------------------------------------------------------------------- cache


def wheel_key(lib: str, args: LoadArgs, inputs: dict[str, str]) -> str:
    blob = json.dumps([inputs, lib, LIBRARIES[lib], args.__dict__], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_or_reuse(lib: str, venv: Path, cuda_home: Path, inputs: dict[str, str]) -> dict[str, Any]:
    """The library's wheel from the cache, else built and cached; returns its record."""
    args = load_args(lib, cuda_home)
    slot = CACHE / "wheels" / f"{lib}-{wheel_key(lib, args, inputs)}"
    record_file = slot / "build.json"
    if record_file.exists():
        record: dict[str, Any] = json.loads(record_file.read_text())
        record["from_cache"] = True
        return record
    bdir = build_dir(lib)
    log(f"{lib}: building {len(args.sources)} units at -j{JOBS} in {bdir}, where ninja keeps "
        f"those up to date (log: {bdir}/build.log)")
    timing = compile_in_venv(venv, cuda_home, args, bdir)
    slot.mkdir(parents=True, exist_ok=True)
    wheel = make_wheel(lib, Path(timing["module"]), slot)
    record = {
        "library": f"{lib}=={LIBRARIES[lib]}",
        "wheel": str(wheel),
        "units": len(args.sources),
        "jobs": JOBS,
        **timing,
        "module_bytes": Path(timing["module"]).stat().st_size,
        "wheel_bytes": wheel.stat().st_size,
        "cuda_cflags": args.cuda_cflags,
        "inputs": inputs,
    }
    record_file.write_text(json.dumps(record, indent=1))
    record["from_cache"] = False
    return record


def place_wheel(record: dict[str, Any], dest: Path) -> Path:
    """Into .whl/, replacing other builds of the same module and nothing else (the
    wheels `make gpu-wheels` put there stay)."""
    wheel = Path(record["wheel"])
    dest.mkdir(exist_ok=True)
    dist = wheel.name.split("-")[0]
    for old in dest.glob(f"{dist}-*.whl"):
        if old.name != wheel.name:
            old.unlink()
    shutil.copy2(wheel, dest / wheel.name)
    return dest / wheel.name


def mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def report_build(record: dict[str, Any]) -> None:
    how = "from the cache, built earlier in" if record["from_cache"] else "built in"
    steps = record.get("ninja_steps", "?")
    log(f"{record['library']}: {how} {record['wall_s']:.0f} s wall, {record['cpu_s']:.0f} CPU-s "
        f"({steps} ninja steps for {record['units']} units, -j{record['jobs']}); "
        f"module {mib(record['module_bytes'])}, "
        f"wheel {mib(record['wheel_bytes'])}: {Path(record['wheel']).name}")



# ---------------------------------------------------------------------------- check


def names_called(src: Path, lib: str) -> set[str]:
    """The extension functions the library's Python (under src) calls: ``ext_c.name`` in
    exllamav2, ``<alias>.name`` after ``import exllamav3_ext as <alias>`` in exllamav3.
    Read as tokens, so that a call left in a comment is not asked for."""
    names: set[str] = set()
    for path in (src / lib).rglob("*.py"):
        text = path.read_text(errors="replace")
        # "import exllamav2_ext as ext_c", or ext.py's own "ext_c = exllamav2_ext"
        pattern = rf"import {lib}_ext as (\w+)|^(\w+) = {lib}_ext$"
        aliases = {a or b for a, b in re.findall(pattern, text, re.M)}
        if f"import {lib}_ext" in text:
            aliases.add(f"{lib}_ext")
        if aliases:
            names |= attributes_of(text, aliases)
    return names


def attributes_of(text: str, aliases: set[str]) -> set[str]:
    """``x`` of every ``alias.x`` in the code (not its comments)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type in (tokenize.NAME, tokenize.OP)]
    return {c.string for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False)
            if a.string in aliases and b.string == "." and c.type == tokenize.NAME}


def glibc_needs(module: Path) -> dict[str, str]:
    """The newest GLIBC/GLIBCXX/CXXABI version each the module asks for (the GPU
    machine's system libraries must be at least as new)."""
    out = subprocess.run(["objdump", "-T", str(module)], capture_output=True, text=True,
                         check=True).stdout
    newest: dict[str, tuple[int, ...]] = {}
    for family, ver in re.findall(r"\b(GLIBC|GLIBCXX|CXXABI)_([\d.]+)", out):
        parts = tuple(int(x) for x in ver.split("."))
        newest[family] = max(newest.get(family, parts), parts)
    return {k: ".".join(map(str, v)) for k, v in sorted(newest.items())}


def needed_libs(module: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(module)], capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.+)\]", out)


def check_wheels(venv: Path, wheels: list[Path]) -> bool:
    """Install the wheels as the GPU run does, then import each beside torch 2.11 under
    Python 3.12, and through its library's own loader."""
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-prebuilt-check-") as tmp:
        target = Path(tmp) / "site"
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", "--no-index", "--no-deps",
                        "--target", str(target), *map(str, wheels)], check=True)
        for wheel in wheels:
            lib = wheel.name.split("-")[0].removesuffix("_ext")
            module = next(target.glob(f"{lib}_ext.*.so"))
            ok &= check_one(venv, lib, module, target, Path(tmp))
    return ok


def check_one(venv: Path, lib: str, module: Path, target: Path, tmp: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1",
           # Were the library to miss the module and fall back to its JIT build, it
           # would fail at once here rather than compile for an hour.
           "CUDA_HOME": str(tmp / "no-cuda"), "TORCH_EXTENSIONS_DIR": str(tmp / "jit"),
           "TORCH_CUDA_ARCH_LIST": ARCH_LIST}
    proc = subprocess.run([str(venv / "bin" / "python"), "-W", "ignore", str(HERE), "_probe", lib],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"check {lib}: FAILED (rc {proc.returncode})\n"
              f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        return False
    probe = json.loads(lines[-1])
    called = names_called(library_sources(lib), lib)
    missing = sorted(called - set(probe["names"]))
    print(f"check {lib}_ext: {module.name}, {mib(module.stat().st_size)} installed")
    print(f"  import beside torch {probe['torch']} (CUDA {probe['torch_cuda']}) under "
          f"Python {probe['python']}: ok, {len(probe['names'])} functions, from {probe['file']}")
    took = probe["library_took_it"]
    print(f"  {lib}.ext took the prebuilt module (no JIT build): {took}"
          + (f" ({probe['library_error']})" if probe.get("library_error") else ""))
    print(f"  functions {lib}'s Python calls: {len(called)}, missing from the module: "
          f"{', '.join(missing) or 'none'}")
    print(f"  NEEDED: {' '.join(needed_libs(module))}")
    print(f"  newest symbol versions asked for: {glibc_needs(module)}")
    return not missing and took is True


def run_probe(lib: str) -> int:
    """Under the venv: what the GPU run's import sees."""
    import torch

    module = importlib.import_module(f"{lib}_ext")
    # The library's own import can fail for reasons of its own (an attribute it reads
    # from the module at import, say): reported beside the names, not instead of them.
    error = ""
    try:
        library_ext = importlib.import_module(f"{lib}.ext")
        took: bool | None = getattr(library_ext, f"{lib}_ext", None) is module
    except Exception as exc:  # any failure is the finding
        took, error = None, f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0], "file": module.__file__,
        "names": sorted(n for n in dir(module) if not n.startswith("__")),
        "library_took_it": took, "library_error": error,
    }))
    return 0



def carried_bytes(dest: Path) -> tuple[int, int]:
    """What a device run carries: every wheel in dest, and the tracked tree."""
    wheels = sum(w.stat().st_size for w in dest.glob("*.whl"))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.split(b"\0")
    paths = [ROOT / f.decode() for f in tracked if f]
    tree = sum(p.stat().st_size for p in paths if p.is_file())
    return wheels, tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="then install and import the wheels")
    parser.add_argument("--only", choices=sorted(LIBRARIES), action="append",
                        help="build this library only (repeatable)")
    parser.add_argument("--dest", type=Path, default=WHEELS, help="where the wheels go (.whl/)")
    parser.add_argument("--carry-max-mb", type=int, default=64)
    opts = parser.parse_args(argv)
    start = time.monotonic()
    python = find_python312()
    venv = ensure_venv(python)
    cuda_home = ensure_cuda_home(venv)
    inputs = build_inputs(python)
    placed, failed = [], []
    for lib in opts.only or sorted(LIBRARIES):
        try:
            record = build_or_reuse(lib, venv, cuda_home, inputs)
        except BuildError as exc:
            failed.append(lib)
            log(f"FAILED: {exc}")
            continue
        report_build(record)
        placed.append(place_wheel(record, opts.dest))
    wheels, tree = carried_bytes(opts.dest)
    log(f"{len(placed)} wheel(s) placed in {opts.dest} after {time.monotonic() - start:.0f} s; "
        f".whl holds {mib(wheels)}, with the tracked tree {mib(wheels + tree)} of "
        f"{opts.carry_max_mb} MiB a device run carries")
    over = wheels + tree > opts.carry_max_mb * 1048576
    if over:
        log(f"FAILED: over the {opts.carry_max_mb} MiB a device run carries")
    checked = check_wheels(venv, placed) if opts.check and placed else True
    if failed:
        log(f"FAILED: {', '.join(failed)} did not build (above); the others are in {opts.dest}")
    return 1 if failed or over or not checked else 0


def main_internal(argv: list[str]) -> int | None:
    """The steps run under the venv's Python 3.12, beside torch."""
    if argv and argv[0] == "_compile":
        return run_compile(argv[1], argv[2])
    if argv and argv[0] == "_probe":
        return run_probe(argv[1])
    return None


if __name__ == "__main__":
    internal = main_internal(sys.argv[1:])
    sys.exit(main() if internal is None else internal)
