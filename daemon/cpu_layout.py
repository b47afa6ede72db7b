"""What the CPU offers the transformers engine: native bf16, and how to lay workers out.

Pure functions over what /proc/cpuinfo and the scheduler say, so the policy has unit
tests; the supervisor and the engine call them. Nothing heavy is imported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Instruction sets that do bf16 arithmetic natively: AVX512_BF16 (dot products of
# bf16 pairs, Zen 4 and Cooper Lake on) and AMX (Sapphire Rapids on). Without one,
# oneDNN emulates bf16 and runs slower than fp32.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first processor's feature flags; empty where /proc/cpuinfo is unreadable."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: Iterable[str]) -> bool:
    return not BF16_FLAGS.isdisjoint(flags)


@dataclass(frozen=True, slots=True)
class CpuLayout:
    """How ``exgen serve`` spreads CPU worker slots over the cores."""

    workers: int
    threads_per_worker: int

    def env(self) -> dict[str, str]:
        """Environment for each worker: its thread count, and OpenMP threads that sleep
        at a barrier instead of spinning (a spinning thread burns the core another
        process, or the sibling worker, needs; measured in bench/RESULTS.md)."""
        return {
            "OMP_NUM_THREADS": str(self.threads_per_worker),
            "OMP_WAIT_POLICY": "PASSIVE",
        }


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


MAX_DEFAULT_CPU_WORKERS = 8
# Workers' model copies may take at most this share of the memory available at start.
CPU_WEIGHTS_MEMORY_SHARE = 0.5


def default_cpu_workers(
    cores: int, available: int | None = None, model_bytes: int | None = None
) -> int:
    """CPU worker slots when none are asked for: one single-threaded worker per core.

    Measured on 2 cores (bench/RESULTS.md, CPU worker layout): one worker with a
    thread per core loses most of its speed when another process takes a core (each
    OpenMP barrier waits for the descheduled thread), while one worker per core, each
    with one thread, only loses that core's share. Each worker holds a copy of the
    model, so there are at most 8 (past that a worker gets several threads) and
    their copies fit in half the available memory.
    """
    workers = min(cores, MAX_DEFAULT_CPU_WORKERS)
    if available is not None and model_bytes:
        workers = min(workers, int(available * CPU_WEIGHTS_MEMORY_SHARE) // model_bytes)
    return max(1, workers)


def model_memory_bytes(path: Path) -> int | None:
    """About what one loaded copy of the model at ``path`` takes (bf16/fp32 weights):
    a GGUF is dequantised (4x its file: 4-bit to 16-bit), safetensors are read as they
    are, but up to twice that in fp32. None where nothing is found."""
    if path.is_file():
        return path.stat().st_size * 4 if path.suffix == ".gguf" else path.stat().st_size * 2
    if not path.is_dir():
        return None
    ggufs = list(path.glob("*.gguf"))
    if ggufs:
        return max(p.stat().st_size for p in ggufs) * 4
    weights = [p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern)]
    return sum(p.stat().st_size for p in weights) * 2 or None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_layout(cpu_slots: int, cores: int) -> CpuLayout:
    """Threads per worker for ``cpu_slots`` workers on ``cores`` cores: an even share."""
    slots = max(1, cpu_slots)
    return CpuLayout(slots, max(1, cores // slots))


def worker_env(layout: CpuLayout, environ: Mapping[str, str], is_cpu_slot: bool) -> dict[str, str]:
    """What to add to a worker's environment; a variable the user set is kept."""
    if not is_cpu_slot:
        return {}
    return {k: v for k, v in layout.env().items() if k not in environ}
