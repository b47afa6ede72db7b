"""guidellm (vLLM's load generator, pinned, in a venv of its own: `make setup` builds
.venv-guidellm, since guidellm pins click and multidict below the project's) against
`exgen serve --http` on the demo model, with its default settings and synthetic data:
it sets vLLM's ``ignore_eos`` whenever the data names an output length, and streams
with usage. A short bounded run must finish with every request successful."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exgen.daemon import modelstore
from tests.conftest import ROOT
from tests.integration.http_support import HttpDaemon, demo_over_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

GUIDELLM = ROOT / ".venv-guidellm" / "bin" / "guidellm"
REQUESTS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpDaemon]:
    with demo_over_http(tmp_path_factory.mktemp("guidellm")) as daemon:
        yield daemon


def demo_tokenizer(folder: Path) -> Path:
    """The demo model's tokenizer as a folder: guidellm counts synthetic prompts'
    tokens with a local Hugging Face tokenizer (no hub here)."""
    from transformers import AutoTokenizer

    gguf = modelstore.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    tokenizer.save_pretrained(str(folder))
    return folder


def test_guidellm_synthetic_data_runs_with_no_errors(served: HttpDaemon, tmp_path: Path) -> None:
    if not GUIDELLM.exists():
        pytest.fail(f"{GUIDELLM} is missing: `make setup` builds it")
    report = tmp_path / "guidellm.json"
    run = subprocess.run(
        [
            str(GUIDELLM), "run",
            "--backend", f"kind=openai_http,target={served.url}",
            "--profile", "kind=synchronous",
            "--constraint", f"kind=max_requests,count={REQUESTS}",
            "--tokenizer", f"kind=hf_auto,model={demo_tokenizer(tmp_path / 'tokenizer')}",
            "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=16",
            "--output", f"kind=json,path={report}",
            "--disable-console-interactive",
        ],
        capture_output=True, text=True, timeout=420, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [benchmark] = json.loads(report.read_text())["benchmarks"]
    made = benchmark["scheduler_metrics"]["requests_made"]
    assert made == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}
    # ignore_eos held every answer to the length the data named
    outputs = [r["output_tokens"] for r in benchmark["requests"]["successful"]]
    assert outputs == [16] * REQUESTS, outputs
