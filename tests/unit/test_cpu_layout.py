"""The CPU layout policy: native bf16 detection and how CPU workers share the cores."""

from __future__ import annotations

from pathlib import Path

from exgen.daemon.cpu_layout import (
    MAX_DEFAULT_CPU_WORKERS,
    CpuLayout,
    cpu_flags,
    cpu_layout,
    default_cpu_workers,
    model_memory_bytes,
    native_bf16,
    worker_env,
)

ZEN4 = "fpu vme avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SKYLAKE = "fpu vme avx2 avx512f avx512bw avx512_vnni"


def test_cpu_flags_read_the_first_processor(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {ZEN4}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert "avx512_bf16" in cpu_flags(info)
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_native_bf16_needs_avx512_bf16_or_amx() -> None:
    assert native_bf16(ZEN4.split())
    assert native_bf16(["amx_bf16", "amx_tile"])
    assert not native_bf16(SKYLAKE.split())
    assert not native_bf16([])


def test_default_is_one_worker_per_core_capped() -> None:
    assert default_cpu_workers(1) == 1
    assert default_cpu_workers(2) == 2
    assert default_cpu_workers(64) == MAX_DEFAULT_CPU_WORKERS


def test_default_workers_fit_their_model_copies_in_half_the_memory() -> None:
    gib = 2**30
    assert default_cpu_workers(2, available=20 * gib, model_bytes=gib // 2) == 2
    assert default_cpu_workers(8, available=20 * gib, model_bytes=4 * gib) == 2
    assert default_cpu_workers(8, available=20 * gib, model_bytes=16 * gib) == 1
    assert default_cpu_workers(4, available=None, model_bytes=16 * gib) == 4  # unknown: cores


def test_model_memory_estimate(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"x" * 100)
    assert model_memory_bytes(tmp_path / "m.gguf") == 400  # 4-bit weights to 16-bit
    weights = tmp_path / "hf"
    weights.mkdir()
    (weights / "model-1.safetensors").write_bytes(b"x" * 10)
    (weights / "model-2.safetensors").write_bytes(b"x" * 20)
    assert model_memory_bytes(weights) == 60  # bf16 on disk may load as fp32
    assert model_memory_bytes(tmp_path / "absent") is None


def test_cores_are_shared_evenly_between_workers() -> None:
    assert cpu_layout(2, 2) == CpuLayout(2, 1)
    assert cpu_layout(1, 2) == CpuLayout(1, 2)
    assert cpu_layout(8, 64) == CpuLayout(8, 8)
    assert cpu_layout(4, 2) == CpuLayout(4, 1)  # more workers than cores: one thread each
    assert cpu_layout(0, 2) == CpuLayout(1, 2)


def test_worker_env_keeps_what_the_user_set_and_leaves_gpu_slots_alone() -> None:
    layout = CpuLayout(2, 1)
    assert worker_env(layout, {}, is_cpu_slot=True) == {
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    assert worker_env(layout, {"OMP_NUM_THREADS": "4"}, is_cpu_slot=True) == {
        "OMP_WAIT_POLICY": "PASSIVE"
    }
    assert worker_env(layout, {}, is_cpu_slot=False) == {}
