"""The GPU engines on a machine without CUDA: `exgen serve --engine exllamav2`
(or exllamav3) exits non-zero within seconds with a one-line reason, no restart loop."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.timeout(120)


def exl2_shaped_model(directory):
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096})
    )
    (directory / "tokenizer.json").write_text("{}")
    numpy = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    weights = {"model.embed_tokens.weight": numpy.zeros((8, 4), dtype=numpy.float16)}
    safetensors_numpy.save_file(weights, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("engine", ["exllamav2", "exllamav3"])
def test_gpu_engine_without_cuda_exits_with_one_line(daemon_factory, tmp_path, engine):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the engine would load")
    model = exl2_shaped_model(tmp_path / "model")
    daemon = daemon_factory(
        "--engine", engine, "--model", str(model), "--workers", "2", ready=False
    )
    started = time.monotonic()
    code = daemon.proc.wait(90)
    elapsed = time.monotonic() - started
    log = daemon.log_text()
    assert code != 0, log
    assert elapsed < 60, f"took {elapsed:.0f}s to give up"
    reason = [line for line in log.splitlines() if "no worker could start" in line]
    assert len(reason) == 1, log
    assert f"{engine} unavailable:" in reason[0]
    assert "CUDA" in reason[0], reason[0]  # the real reason, not a complaint about the files
    assert "restart slot" not in log
