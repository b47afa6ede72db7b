"""GPU truth in one prepared run: exgen's engines on a real GPU, measured.

One command for the rare moments a GPU machine is lent (one H200, no network, a
few minutes). In order, each step time-boxed so that one broken step cannot eat the
budget — the rest still run, and the table says what failed and why:

- install: exgen and the wheels carried in ``.whl/`` (``make gpu-wheels``) with
  ``pip install --no-index --no-deps --target``, then PYTHONPATH; versions printed.
  The exllama extensions come prebuilt (``make gpu-prebuilt``): each is imported
  once beside torch in a subprocess first, and one that fails there (or is absent)
  is removed again and JIT-built instead (ninja/nvcc, Hopper only) in the
  background, paused while any step but the model's runs.
- model: a Llama with a real shape and random fp16 weights (bench/gpu_model.py).
- f: the transformers engine (bf16, one GPU slot) against the seeds' recipe
  (left-padded batches of 16, greedy) in-process, rounds alternating; then kill -9
  of the GPU worker mid-job.
- a/b/d: the ExLlamaV2 dynamic generator alone in-process (a) against
  ``exgen serve --engine exllamav2`` with one GPU slot fed by ``exgen-client submit``
  (b), rounds alternating, ratio b/a (goal >= 0.95); then kill -9 of the worker
  mid-job (d): restarted, its GPU memory released, every result once, restart time
  against its load time (goal < 2x).
- c: two slots on the one GPU.
- e: a/b/d again with ExLlamaV3, once its extension has built.
- g: tests/gpu against the model, per engine.

``--dry-run`` runs the same steps on a CPU machine: the synthetic engine stands in
for the exllama runs, the transformers engine runs a tiny Llama on the CPU, and the
JIT builds are skipped. It is what CI runs (tests/integration/test_gpu_check.py).

The table is printed last; the full log and a JSON report go to ``$OUT`` when it is
set (else to the work directory).

    python3 bench/gpu_check.py              # on the GPU machine (docs/gpus.md)
    python3 bench/gpu_check.py --dry-run    # here

This module imports the standard library only: it runs before anything is installed.
The steps themselves run in subprocesses (``--step``, bench/gpu_steps.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from gpu_model import SHAPES  # the standard library only, like this module

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS = ROOT / ".whl"
# The whole run with prebuilt extensions, in a device call of 7 minutes (docs/gpus.md).
GPU_BUDGET_S = 400
DRY_BUDGET_S = 240
# For every process the run starts: offline, unbuffered, no progress bars.
QUIET_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}
HOPPER_ARCH = "9.0"  # H100/H200: a JIT build for this one architecture only
PREBUILT_IMPORT_S = 120  # a prebuilt extension's test import: mostly torch's own import
LOG_TAIL = 6000  # characters of a daemon or build log copied into the main log
BUILD_LOG_MAX = 4_000_000  # characters of a build log kept in $OUT (files come back <= 16 MiB)


@dataclass(frozen=True)
class StepSpec:
    name: str
    rows: str  # the table rows this step fills
    title: str
    box_s: float  # at most this long (GPU run)
    min_s: float  # not started with less than this left
    needs: str | None = None  # an extension that must be there (prebuilt or built) first
    run_s: float = 0.0  # time the step needs once its extension is there
    measured: bool = True  # JIT builds still compiling are paused (SIGSTOP) meanwhile


# Sized for prebuilt extensions (no step waits for a build): the boxes are ceilings, and
# the least times are kept free for the later steps (plan_step_time).
STEPS: tuple[StepSpec, ...] = (
    StepSpec("model", "-", "make a random-weight Llama", 90, 20, measured=False),
    StepSpec("hf", "f", "transformers engine vs the seeds' recipe, kill -9", 110, 40),
    StepSpec("exl2", "a b d", "ExLlamaV2 alone vs exgen, kill -9", 110, 50, "exllamav2", 60),
    StepSpec("two_slots", "c", "two slots on the one GPU", 50, 15, "exllamav2", 30),
    StepSpec("gpu_tests_v2", "g", "tests/gpu on exllamav2", 70, 30, "exllamav2", 30),
    StepSpec("exl3", "e", "ExLlamaV3 alone vs exgen, kill -9", 110, 45, "exllamav3", 60),
    StepSpec("gpu_tests_v3", "g", "tests/gpu on exllamav3", 60, 25, "exllamav3", 25),
)
BUILDS = ("exllamav2", "exllamav3")


@dataclass
class Plan:
    """Everything a step needs, written to the work directory as plan.json."""

    dry_run: bool
    root: str
    workdir: str
    out_dir: str
    model_dir: str
    shape: str
    prompts_file: str
    prompts: int
    max_new_tokens: int
    kill_max_new_tokens: int
    kill_after_s: float  # kill once the worker has been busy this long (or answered one)
    rounds: int
    gpus: str | None  # the GPU the slots use ("0"); None: CPU worker slots
    engines: dict[str, str]  # role -> engine: exl2/exl3 (synthetic in a dry run), hf
    engine_opts: dict[str, dict[str, str]]  # engine -> --engine-opt values
    client: list[str]  # the exgen-client command
    site: str | None = None  # where install put exgen and the wheels

    @staticmethod
    def load(path: Path) -> Plan:
        return Plan(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


# --- logging: one full log, a short stdout --------------------------------------------


class Log:
    """The full log (a file) and the few lines that also go to stdout."""

    def __init__(self, path: Path, verbose: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: TextIO = path.open("w", encoding="utf-8")
        self.verbose = verbose
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def line(self, text: str, show: bool = False) -> None:
        stamp = f"[{time.monotonic() - self.t0:6.1f}s] "
        with self.lock:
            self.file.write(stamp + text + "\n")
            self.file.flush()
        if show or self.verbose:
            print(stamp + text, flush=True)

    def block(self, title: str, text: str) -> None:
        tail = text[-LOG_TAIL:]
        self.line(f"--- {title} ({len(text)} chars, last {len(tail)}) ---\n{tail}\n--- end ---")


# --- subprocesses that can be time-boxed -----------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EXGEN_ADDRESS", None)  # the steps start their own daemons
    return env


def run_boxed(cmd: list[str], timeout: float, log: Log, tag: str) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, its output into the log; kill the whole
    group at ``timeout``. Returns (exit code or None when killed, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(),
        start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    reader = threading.Thread(target=_copy_lines, args=(proc, log, tag), daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        log.line(f"[{tag}] time box of {timeout:.0f}s reached: killing its process group")
        stop_group(proc)
        code = None
    reader.join(timeout=5)
    if not reader.is_alive() and proc.stdout is not None:
        proc.stdout.close()
    return code, time.monotonic() - started


def _copy_lines(proc: subprocess.Popen[bytes], log: Log, tag: str) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        log.line(f"[{tag}] {raw.decode('utf-8', 'replace').rstrip()}")


def stop_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM the process group (a daemon drains), then SIGKILL whatever of the group
    is left, even once its leader is gone: a daemon left running would hold the GPU
    through the next step (its workers die with it, PR_SET_PDEATHSIG)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


# --- install ---------------------------------------------------------------------------


def install(plan: Plan, log: Log) -> dict[str, Any]:
    """exgen (from this tree) and the carried wheels into one target directory."""
    site = Path(plan.workdir) / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-cache-dir", "--upgrade", "--target", str(site)]  # fmt: skip
    result: dict[str, Any] = {"target": str(site)}
    wheels = sorted(WHEELS.glob("*.whl"))
    prebuilt = prebuilt_wheels(wheels)
    plain = [w for w in wheels if w not in prebuilt.values()]
    if plan.dry_run:
        result["wheels"] = f"not installed in a dry run ({len(wheels)} cp312 wheels in .whl/)"
    elif not plain:
        raise StepError("no wheels in .whl/: run `make gpu-wheels` here, carry .whl")
    else:
        _pip(log, [*pip, "--no-compile", *map(str, plain)], "wheels")
        result["wheels"] = [w.name for w in plain]
    try:
        _pip(log, [*pip, "--no-build-isolation", str(ROOT)], "exgen")
        result["exgen"] = "installed from this tree"
    except StepError as exc:  # an old setuptools there, say: run the tree itself
        link_exgen(site)
        result["exgen"] = f"linked from this tree ({exc})"
        log.line(f"exgen: {result['exgen']}", show=True)
    if not plan.dry_run:  # a dry run keeps this interpreter's environment (the venv)
        plan.site = str(site)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p
        )
    if not plan.dry_run:  # the JIT stand-ins of a dry run need no extension
        result["extensions"] = {
            name: asdict(use_prebuilt(name, prebuilt.get(name), site, pip, log)) for name in BUILDS
        }
    result["versions"] = installed_versions()  # a prebuilt module that stayed, with its version
    return result


# --- the prebuilt extensions (make gpu-prebuilt) ----------------------------------------


@dataclass
class Prebuilt:
    """Whether a library's prebuilt extension is used, and why not."""

    wheel: str | None
    used: bool
    reason: str  # how it was found, or why the JIT build stands in
    import_s: float | None = None


def prebuilt_wheels(wheels: list[Path]) -> dict[str, Path]:
    """The prebuilt extensions among the carried wheels, by library (``exllamav2_ext-…``)."""
    found: dict[str, Path] = {}
    for wheel in wheels:
        dist = wheel.name.split("-")[0]
        for name in BUILDS:
            if dist == f"{name}_ext":
                found[name] = wheel
    return found


def use_prebuilt(name: str, wheel: Path | None, site: Path, pip: list[str], log: Log) -> Prebuilt:
    """Install the wheel on its own (one the machine refuses must not stop the others)
    and import it beside torch in a subprocess. A module that cannot be imported is
    removed again: the library would import it rather than build its own."""
    if wheel is None:
        return Prebuilt(None, False, "no prebuilt wheel in .whl/ (make gpu-prebuilt)")
    code, _ = run_boxed([*pip, str(wheel)], 120, log, f"pip {wheel.name}")
    if code != 0:
        return Prebuilt(wheel.name, False, f"pip did not install it (exit {code}); see the log")
    started = time.monotonic()
    problem = import_problem(f"{name}_ext", site)
    if problem:
        remove_module(site, f"{name}_ext")
        log.line(f"{name}: the prebuilt module does not import ({problem}): JIT build", show=True)
        return Prebuilt(wheel.name, False, f"does not import: {problem}")
    seconds = round(time.monotonic() - started, 1)
    log.line(f"{name}: prebuilt {wheel.name} imports (with torch, {seconds}s)", show=True)
    return Prebuilt(wheel.name, True, "imports beside torch", seconds)


def import_problem(module: str, site: Path, timeout: float = PREBUILT_IMPORT_S) -> str | None:
    """None when ``import torch, module`` succeeds from ``site`` in a fresh interpreter,
    else the error's last line (an undefined symbol names the torch it was built for)."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    where = str(site.resolve())
    code = (f"import torch, {module}, pathlib\n"
            f"assert pathlib.Path({module}.__file__).resolve().is_relative_to({where!r}), "
            f"{module}.__file__")  # fmt: skip
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=site, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"the import took over {timeout:.0f}s"
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    return (lines or [f"exit {proc.returncode}"])[-1][:300]


def remove_module(site: Path, module: str) -> None:
    """The module and its wheel's metadata out of the target."""
    for path in [*site.glob(f"{module}.*"), *site.glob(f"{module}-*.dist-info")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _pip(log: Log, cmd: list[str], what: str) -> None:
    code, seconds = run_boxed(cmd, 300, log, f"pip {what}")
    if code != 0:
        raise StepError(f"pip install of {what} failed (exit {code}); see the log")
    log.line(f"installed {what} in {seconds:.1f}s")


def link_exgen(site: Path) -> None:
    """exgen.client and exgen.daemon as links into this tree, with enough metadata
    for importlib.metadata; the CLIs then run as ``python -m``."""
    package = site / "exgen"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("client", "daemon"):
        link = package / name
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        link.unlink(missing_ok=True)
        link.symlink_to(ROOT / name, target_is_directory=True)
    info = site / "exgen-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exgen\nVersion: 0.0.0+tree\n")


VERSION_DISTS = (
    "exgen", "torch", "transformers", "accelerate", "tokenizers", "safetensors",
    "exllamav2", "exllamav3", "exllamav2_ext", "exllamav3_ext", "pyzmq", "msgpack", "click",
    "ninja", "pydantic", "flash-attn",
)  # fmt: skip


def installed_versions() -> dict[str, str]:
    """Versions as the steps will see them (a subprocess, with PYTHONPATH)."""
    code = (
        "import json, sys, importlib.metadata as m\n"
        "out = {'python': sys.version.split()[0]}\n"
        f"for d in {VERSION_DISTS!r}:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60
    )
    versions: dict[str, str] = json.loads(proc.stdout)
    return versions


class StepError(RuntimeError):
    """A step that cannot go on, with the reason for the table."""


# --- the exllama extensions' JIT builds --------------------------------------------------


@dataclass
class Build:
    """A library's extension: prebuilt, or its JIT build in the background."""

    name: str
    prebuilt: dict[str, Any] | None = None  # asdict(Prebuilt), from install
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    started: float = 0.0
    ended: float | None = None
    code: int | None = None
    note: str = ""

    @property
    def uses_prebuilt(self) -> bool:
        return bool(self.prebuilt and self.prebuilt["used"])

    @property
    def done(self) -> bool:
        return self.uses_prebuilt or self.ended is not None

    @property
    def ok(self) -> bool:
        return self.uses_prebuilt or (self.ended is not None and self.code == 0)

    def poll(self) -> None:
        if self.proc is not None and self.ended is None and self.proc.poll() is not None:
            self.ended = time.monotonic()
            self.code = self.proc.returncode


# Headers the extensions include that a bare toolkit may lack: exllamav2 includes
# cublas_v2.h, torch's CUDA headers cusparse.h, exllamav3's sampling curand_kernel.h.
LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h", "curand_kernel.h")


def build_env(workdir: Path) -> dict[str, str]:
    """What the JIT builds need: one architecture, every core, a known cache dir, and
    the library headers (LIBRARY_HEADERS). torch finds nvcc itself ($CUDA_HOME, nvcc on
    PATH, /usr/local/cuda)."""
    env = {
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST") or HOPPER_ARCH,
        "MAX_JOBS": os.environ.get("MAX_JOBS") or str(os.cpu_count() or 8),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
        or str(workdir / "torch_extensions"),
    }
    extra = pip_cuda_includes()
    if extra:
        env["CPATH"] = os.pathsep.join([*extra, *filter(None, [os.environ.get("CPATH")])])
    return env


def toolkit_include() -> Path | None:
    """The include directory of the CUDA toolkit torch will build with."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    roots = [Path(home)] if home else []
    roots += [Path(nvcc).resolve().parent.parent] if nvcc else []
    for root in [*roots, Path("/usr/local/cuda")]:
        if (root / "include" / "cuda_runtime.h").is_file():
            return root / "include"
    return None


def pip_cuda_includes() -> list[str]:
    """Header directories of the pip CUDA libraries (nvidia/*/include), when the
    toolkit itself lacks one of LIBRARY_HEADERS: nvcc and g++ then find them on CPATH."""
    inc = toolkit_include()
    if inc is not None and all((inc / h).is_file() for h in LIBRARY_HEADERS):
        return []
    dirs: list[str] = []
    for base in map(Path, filter(None, sys.path)):
        if any(base.glob("nvidia/*/include/cublas_v2.h")):
            dirs += [str(p) for p in sorted(base.glob("nvidia/*/include"))]
    return list(dict.fromkeys(dirs))


def start_builds(plan: Plan, log: Log, prebuilt: dict[str, dict[str, Any]]) -> dict[str, Build]:
    """The JIT builds of the extensions that came without a working prebuilt module:
    import each exllama once in the background, which builds its extension (minutes)
    into TORCH_EXTENSIONS_DIR, where the workers find it later. exllamav2, which most
    steps need, runs at normal priority; exllamav3 yields to it (nice)."""
    builds = {name: Build(name, prebuilt.get(name)) for name in BUILDS}
    if plan.dry_run:
        for b in builds.values():
            b.note = "skipped: dry run (the synthetic engine stands in for exllama)"
        return builds
    jit = [b for b in builds.values() if not b.uses_prebuilt]
    if not jit:
        return builds
    env = build_env(Path(plan.workdir))
    os.environ.update(env)  # every later process (daemon workers too) uses the same cache
    log.line(f"JIT build settings: {env}", show=True)
    for build in jit:
        name, niceness = build.name, 0 if build.name == "exllamav2" else 10
        clear_stale_lock(Path(env["TORCH_EXTENSIONS_DIR"]), name)
        build.log_path = Path(plan.workdir) / f"build-{name}.log"
        code = f"import time; t = time.time(); import {name}; print('built in', time.time() - t)"
        with build.log_path.open("wb") as out:
            build.proc = subprocess.Popen(
                [sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                env=child_env(), start_new_session=True, cwd=plan.workdir,
                preexec_fn=(lambda n=niceness: os.nice(n)) if niceness else None,
            )  # fmt: skip
        build.started = time.monotonic()
    return builds


def clear_stale_lock(ext_dir: Path, name: str) -> None:
    """A build killed earlier leaves torch's lock file, and the next import would wait
    for it forever; nothing else builds here now, so it is stale."""
    lock = ext_dir / f"{name}_ext" / "lock"
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()


def build_progress(plan: Plan, name: str) -> str:
    """Objects built so far, of the extension's sources."""
    ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")) / f"{name}_ext"
    built = len(list(ext.glob("*.o"))) if ext.is_dir() else 0
    sources = 0
    for base in filter(None, [plan.site, *sys.path]):
        src = Path(base) / name / f"{name}_ext"
        if src.is_dir():
            sources = sum(1 for p in src.rglob("*") if p.suffix in (".cu", ".cpp"))
            break
    return f"{built} of ~{sources} objects built" if sources else f"{built} objects built"


def signal_builds(builds: dict[str, Build], sig: signal.Signals) -> list[str]:
    """Signal every process of every JIT build still compiling; their names."""
    names = []
    for b in builds.values():
        b.poll()
        if b.proc is not None and not b.done:
            signal_tree(b.proc.pid, sig)
            names.append(b.name)
    return names


def signal_tree(root: int, sig: signal.Signals) -> None:
    """The process and all its descendants, parents first. Not its process group:
    ninja starts each compiler in a group of its own. A second pass catches a child
    started while the first went by (a stopped parent starts no more)."""
    for _ in range(2 if sig == signal.SIGSTOP else 1):
        for pid in process_tree(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def process_tree(root: int) -> list[int]:
    """root and its descendants, parents first, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    order, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        order.append(pid)
        queue += children.get(pid, [])
    return order


def await_build(build: Build, until: float) -> None:
    while build.proc is not None and not build.done and time.monotonic() < until:
        build.poll()
        time.sleep(1.0)
    build.poll()


def build_reason(plan: Plan, build: Build) -> str | None:
    """Why a step that needs this build cannot run, or None."""
    if build.note:
        return None if plan.dry_run else build.note
    if build.ok:
        return None
    if not build.done:
        waited = time.monotonic() - build.started
        progress = build_progress(plan, build.name)
        return f"{build.name} JIT build unfinished after {waited:.0f}s ({progress})"
    return f"{build.name} JIT build failed (exit {build.code}): {build_error(build)}"


def build_error(build: Build) -> str:
    text = build.log_path.read_text(errors="replace") if build.log_path else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def finish_builds(plan: Plan, builds: dict[str, Build], log: Log) -> dict[str, Any]:
    report = {}
    for build in builds.values():
        build.poll()
        if build.proc is not None and not build.done:
            progress = build_progress(plan, build.name)
            compilers = process_tree(build.proc.pid)[1:]  # their own groups: not in stop_group's
            stop_group(build.proc, grace=2.0)
            for pid in compilers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            build.note = f"stopped at the end of the run ({progress}); a rerun resumes it"
        if build.log_path is not None and build.log_path.exists():
            text = build.log_path.read_text(errors="replace")
            log.block(f"build {build.name}", text)
            # The whole compiler output (its end, within what $OUT brings back).
            (Path(plan.out_dir) / build.log_path.name).write_text(text[-BUILD_LOG_MAX:])
        report[build.name] = build_doc(plan, build)
    return report


def build_doc(plan: Plan, build: Build) -> dict[str, Any]:
    """A build's entry in the report (and its table row's source)."""
    seconds = (build.ended or time.monotonic()) - build.started if build.started else None
    return {
        "ok": build.ok,
        "source": "prebuilt" if build.uses_prebuilt else "jit",
        "prebuilt": build.prebuilt,
        "exit": build.code,
        "seconds": round(seconds, 1) if seconds is not None else None,
        "note": build.note or (None if build.ok else build_reason(plan, build)),
    }


# --- running the steps ---------------------------------------------------------------------


@dataclass
class Clock:
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


DRY_BOX_S, DRY_MIN_S = 90.0, 3.0  # a dry run's steps take seconds; CI's runner, a minute


def step_limits(spec: StepSpec, dry: bool) -> tuple[float, float]:
    """(time box, least time to start with) of a step."""
    return (DRY_BOX_S, DRY_MIN_S) if dry else (spec.box_s, spec.min_s)


def plan_step_time(spec: StepSpec, later: list[StepSpec], clock: Clock, dry: bool) -> float:
    """This step's time box: its own, less what the later steps need to start, but
    at least its own minimum while the budget has it (earlier steps come first)."""
    box, least = step_limits(spec, dry)
    reserve = sum(step_limits(s, dry)[1] for s in later)
    left = clock.left()
    return min(left, max(least, min(box, left - reserve)))


def run_steps(plan: Plan, specs: list[StepSpec], builds: dict[str, Build], clock: Clock,
              log: Log) -> dict[str, dict[str, Any]]:  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(specs):
        results[spec.name] = run_one(plan, spec, specs[i + 1 :], builds, clock, log)
        doc = results[spec.name]
        log.line(
            f"<- {spec.name}: {doc['status']} in {doc.get('seconds', 0):.0f}s"
            + (f" — {doc['reason']}" if doc.get("reason") else ""),
            show=True,
        )
    return results


def run_one(plan: Plan, spec: StepSpec, later: list[StepSpec], builds: dict[str, Build],
            clock: Clock, log: Log) -> dict[str, Any]:  # fmt: skip
    box = plan_step_time(spec, later, clock, plan.dry_run)
    if box < step_limits(spec, plan.dry_run)[1]:
        return {"status": "skipped", "reason": f"no time left ({max(box, 0):.0f}s)", "seconds": 0}
    started = time.monotonic()
    if spec.needs:
        build = builds[spec.needs]
        await_build(build, started + box - spec.run_s)
        reason = build_reason(plan, build)
        if reason:
            return {"status": "skipped", "reason": reason, "seconds": time.monotonic() - started}
        if build.proc is not None:  # over: a lock left now is a killed step's
            clear_stale_lock(Path(os.environ["TORCH_EXTENSIONS_DIR"]), spec.needs)
    box -= time.monotonic() - started
    log.line(f"-> {spec.name}: {spec.title} (time box {box:.0f}s)", show=True)
    # A measured step has the cores to itself: a JIT build (nvcc on every core) waits.
    paused = signal_builds(builds, signal.SIGSTOP) if spec.measured else []
    try:
        doc = run_step_process(plan, spec, box, log)
    finally:
        signal_builds(builds, signal.SIGCONT)
    return doc | {"seconds": time.monotonic() - started, "builds_paused": paused}


def run_step_process(plan: Plan, spec: StepSpec, box: float, log: Log) -> dict[str, Any]:
    workdir = Path(plan.workdir)
    result_file = workdir / "steps" / f"{spec.name}.json"
    result_file.unlink(missing_ok=True)
    deadline = time.time() + box - 10  # the step paces itself to end before its box
    cmd = [sys.executable, str(HERE / "gpu_check.py"), "--step", spec.name,
           "--plan", str(workdir / "plan.json"), "--deadline", f"{deadline:.1f}"]  # fmt: skip
    code, _ = run_boxed(cmd, box, log, spec.name)
    doc: dict[str, Any] = json.loads(result_file.read_text()) if result_file.exists() else {}
    if code is None:
        doc["status"] = "timeout"
        doc["reason"] = f"killed at its time box ({box:.0f}s); parts done are kept"
    elif code != 0 and doc.get("status") in (None, "running", "ok"):
        doc["status"] = "failed"
        doc.setdefault("reason", f"step process exited {code}")
    doc.setdefault("status", "failed")
    return doc


# --- the report ------------------------------------------------------------------------------


ROW_TITLES = {
    "a": "ExLlamaV2 alone, in-process",
    "b": "exgen serve, 1 slot, exgen-client submit",
    "c": "two slots on the one GPU",
    "d": "kill -9 of the worker mid-job",
    "e": "ExLlamaV3: alone / exgen / kill -9",
    "f": "transformers engine vs the seeds' recipe",
    "g": "tests/gpu",
}


def table_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """One row per issue item a..g (g from both test steps), plus the setup steps."""
    rows = [_setup_row("install", report["install"]), _setup_row("model", report["steps"]["model"])]
    for name in ("exllamav2", "exllamav3"):
        rows.append(_build_row(name, report["builds"][name]))
    by_row: dict[str, list[dict[str, Any]]] = {}
    for spec in STEPS:
        step = report["steps"].get(spec.name)
        if step is None or spec.rows == "-":
            continue
        for key in spec.rows.split():
            by_row.setdefault(key, []).append(_row_doc(step, key))
    for key in sorted(by_row):
        rows.append(_merge_rows(key, by_row[key]))
    return rows


def _row_doc(step: dict[str, Any], key: str) -> dict[str, Any]:
    """A row's part of a step: its own entry under "rows", else the step's status."""
    row = dict(step.get("rows", {}).get(key) or {})
    if not row:
        row = {"status": step["status"], "summary": "", "reason": step.get("reason", "")}
    row.setdefault("status", step["status"])
    if row["status"] != "ok" and not row.get("reason"):
        row["reason"] = step.get("reason", "")
    return row


SEVERITY = ("failed", "timeout", "refused", "skipped", "not run", "ok")  # worst first


def _merge_rows(key: str, parts: list[dict[str, Any]]) -> dict[str, str]:
    statuses = [p["status"] for p in parts]
    status = min(statuses, key=lambda s: SEVERITY.index(s) if s in SEVERITY else 0)
    text = "; ".join(filter(None, (p.get("summary") or p.get("reason") or "" for p in parts)))
    goal = "; ".join(filter(None, (p.get("goal", "") for p in parts)))
    return {"row": key, "what": ROW_TITLES[key], "status": status, "result": text, "goal": goal}


def _setup_row(name: str, doc: dict[str, Any]) -> dict[str, str]:
    return {"row": "-", "what": name, "status": doc["status"],
            "result": doc.get("summary") or doc.get("reason", ""), "goal": ""}  # fmt: skip


def _build_row(name: str, doc: dict[str, Any]) -> dict[str, str]:
    """Prebuilt, or the JIT build with the reason the prebuilt module was not used."""
    pre = doc.get("prebuilt") or {}
    if pre.get("used"):
        text = f"prebuilt {pre['wheel']}: imports beside torch in {pre['import_s']}s"
        return {"row": "-", "what": f"extension {name}", "status": "ok", "result": text, "goal": ""}
    if doc["ok"]:
        status, text = "ok", f"JIT-built in {doc['seconds']}s"
    elif (doc.get("note") or "").startswith("skipped"):
        status, text = "skipped", doc["note"]
    else:
        status, text = "failed", doc.get("note") or f"exit {doc['exit']}"
    if pre:
        text += f" (prebuilt {pre['wheel'] or 'wheel'} not used: {pre['reason']})"
    return {"row": "-", "what": f"extension {name}", "status": status, "result": text, "goal": ""}


def format_table(rows: list[dict[str, str]], width: int = 100) -> str:
    """Row, status, what; the result (and goal) wrapped beneath, nothing cut off."""
    lines = []
    for r in rows:
        lines.append(f"{r['row']:2} {r['status']:8} {r['what']}")
        result = r["result"] + (f" [goal: {r['goal']}]" if r["goal"] else "")
        lines += textwrap.wrap(result, width, initial_indent=" " * 12, subsequent_indent=" " * 12)
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU stand-ins; for CI")
    p.add_argument("--budget-s", type=float, help=f"whole run (default {GPU_BUDGET_S}s on GPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default llama-3.2-1b)")
    p.add_argument("--prompts", type=int, help="of examples/prompts.jsonl (default 32)")
    p.add_argument("--max-new-tokens", type=int, help="per prompt (default 100, the seeds')")
    p.add_argument("--rounds", type=int, help="alternating rounds per comparison (default 3)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run these steps (and model)")
    p.add_argument("--workdir", type=Path, help="default $TMPDIR/exgen-gpu-check")
    p.add_argument("--verbose", action="store_true", help="the full log on stdout too")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace, workdir: Path, out_dir: Path) -> Plan:
    dry = bool(args.dry_run)
    synthetic = {"capacity": "2", "token_ms": "1", "boot_s": "0.5"}
    engines = {"exl2": "synthetic", "exl3": "synthetic", "hf": "transformers"}
    if not dry:
        engines = {"exl2": "exllamav2", "exl3": "exllamav3", "hf": "transformers"}
    hf_opts = {"dtype": "bfloat16"} if not dry else {"threads": "1"}
    return Plan(
        dry_run=dry,
        root=str(ROOT),
        workdir=str(workdir),
        out_dir=str(out_dir),
        model_dir=str(workdir / "model"),
        shape=args.shape or ("tiny" if dry else "llama-3.2-1b"),
        prompts_file=str(workdir / "prompts.jsonl"),
        prompts=args.prompts or (4 if dry else 32),
        max_new_tokens=args.max_new_tokens or (8 if dry else 100),
        kill_max_new_tokens=args.max_new_tokens or (800 if dry else 100),
        kill_after_s=0.1 if dry else 1.0,
        rounds=args.rounds or (2 if dry else 3),
        # A dry run asks for GPU 0 too (its transformers worker then finds no CUDA and
        # runs on the CPU), so that the --gpus path is the one exercised here.
        gpus="0",
        engines=engines,
        engine_opts={"synthetic": synthetic, "transformers": hf_opts},
        client=[],
    )


def client_command(plan: Plan) -> list[str]:
    """``exgen-client`` as installed: the target's script, the venv's, else -m."""
    candidates = [Path(sys.executable).with_name("exgen-client")]
    if plan.site:
        candidates.insert(0, Path(plan.site) / "bin" / "exgen-client")
    for script in candidates:
        if script.is_file():
            return [sys.executable, str(script)]
    return [sys.executable, "-m", "exgen.client.cli"]


def write_prompts(plan: Plan) -> None:
    """The seeds' prompts (examples/prompts.jsonl), the first N, N new tokens each."""
    lines = (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()][: plan.prompts]
    with open(plan.prompts_file, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"id": row["id"], "prompt": row["prompt"]}) + "\n")


def machine_facts() -> dict[str, Any]:
    """The card, driver, compiler and host the numbers were measured on."""
    facts: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    queries = {
        "gpu": [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ],
        "nvcc": ["nvcc", "--version"],
        "ninja": ["ninja", "--version"],
    }
    for name, cmd in queries.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        facts[name] = out.splitlines()[-1] if out else "none"
    inc = toolkit_include()
    facts["cuda_include"] = str(inc) if inc else "none"
    for header in LIBRARY_HEADERS:  # cublas_v2.h -> cublas_header
        key = header.split(".")[0].split("_")[0] + "_header"
        facts[key] = bool(inc and (inc / header).is_file())
    return facts


def run_install(plan: Plan, log: Log) -> dict[str, Any]:
    started = time.monotonic()
    try:
        doc = install(plan, log)
    except (StepError, subprocess.SubprocessError, OSError, ValueError) as exc:
        return {"status": "failed", "reason": str(exc), "seconds": time.monotonic() - started}
    v = doc["versions"]
    shown = ("python", "torch", "transformers", "exllamav2", "exllamav3", "pyzmq")
    summary = ", ".join(f"{k} {v.get(k)}" for k in shown)
    log.line(f"versions: {json.dumps(v)}", show=True)
    return {**doc, "status": "ok", "summary": summary, "seconds": time.monotonic() - started}


def selected_steps(only: list[str] | None) -> list[StepSpec]:
    if not only:
        return list(STEPS)
    unknown = set(only) - {s.name for s in STEPS}
    if unknown:
        raise SystemExit(
            f"unknown step(s) {sorted(unknown)}: choose from {[s.name for s in STEPS]}"
        )
    return [s for s in STEPS if s.name == "model" or s.name in only]


def orchestrate(args: argparse.Namespace) -> int:
    workdir = (args.workdir or Path(tempfile.gettempdir()) / "exgen-gpu-check").resolve()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else workdir / "out"
    (workdir / "steps").mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "gpu_check.log", args.verbose)
    plan = make_plan(args, workdir, out_dir)
    budget = args.budget_s or (DRY_BUDGET_S if plan.dry_run else GPU_BUDGET_S)
    clock = Clock(time.monotonic() + budget)
    mode = "DRY RUN on the CPU: the synthetic engine stands in for exllama" if plan.dry_run \
        else "GPU run"  # fmt: skip
    log.line(f"gpu_check: {mode}; budget {budget:.0f}s; work dir {workdir}", show=True)
    os.environ.update(QUIET_ENV)
    # torch's JIT runs `ninja`: the pip one sits beside this interpreter, maybe off PATH.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    report: dict[str, Any] = {"mode": "dry-run" if plan.dry_run else "gpu", "budget_s": budget,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    report["machine"] = machine_facts()
    log.line(f"machine: {report['machine']}", show=True)
    report["install"] = run_install(plan, log)
    plan.client = client_command(plan)
    write_prompts(plan)
    plan.save(workdir / "plan.json")
    builds = start_builds(plan, log, report["install"].get("extensions", {}))
    try:
        report["steps"] = run_steps(plan, selected_steps(args.only), builds, clock, log)
    finally:
        report["builds"] = finish_builds(plan, builds, log)
    return finish(report, plan, clock, budget, log)


def finish(report: dict[str, Any], plan: Plan, clock: Clock, budget: float, log: Log) -> int:
    for spec in STEPS:
        report["steps"].setdefault(spec.name, {"status": "not run", "reason": "not selected"})
    report["wall_s"] = round(budget - clock.left(), 1)
    report["plan"] = asdict(plan)
    report["table"] = table_rows(report)
    out = Path(plan.out_dir) / "gpu_check.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = format_table(report["table"])
    log.line("table:\n" + table)
    log.line(f"report: {out}; log: {log.file.name}", show=True)
    print(f"\ngpu_check ({report['mode']}, {report['wall_s']:.0f}s of {budget:.0f}s):\n{table}")
    failed = [r for r in report["table"] if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        from gpu_steps import run_step  # heavy imports: only in a step's own process

        return run_step(args.step, Plan.load(args.plan), args.deadline)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
