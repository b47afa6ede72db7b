"""lm-evaluation-harness (pinned in the dev extra) against `exgen serve --http` on the
demo model, with its default settings: local-completions finds the server's tokenizer
routes (no local tokenizer), sends token-id prompts in batches, and runs a
multiple_choice task (loglikelihood: echo, logprobs, prompt tokens) and a
generate_until task of this test's own to the end; every loglikelihood equals
lm-eval's own hf backend on the same weights in float32 within 1e-3. And
local-chat-completions runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exgen.daemon import modelstore
from tests.integration.http_support import HttpDaemon, demo_over_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

LM_EVAL = Path(sys.executable).with_name("lm_eval")
MC = [
    ("What is the capital of France?", [" Paris", " Berlin", " Madrid", " Rome"], 0),
    ("What colour is the sky on a clear day?", [" green", " blue", " red", " black"], 1),
    ("How many legs does a cat have?", [" two", " six", " four", " eight"], 2),
    ("Which animal barks?", [" cat", " cow", " fish", " dog"], 3),
]
GEN = [("What is the capital of France?", "Paris"), ("What is 2 + 2?", "4")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpDaemon]:
    with demo_over_http(tmp_path_factory.mktemp("lm-eval"), "dtype=float32") as daemon:
        yield daemon


def write_tasks(folder: Path) -> Path:
    folder.mkdir()
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in MC]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    gen = [{"question": q, "answer": a} for q, a in GEN]
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "exgen_mc.yaml").write_text(
        f"task: exgen_mc\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "exgen_gen.yaml").write_text(
        f"task: exgen_gen\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 16\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def lm_eval(tmp_path: Path, name: str, *args: str) -> tuple[dict[str, Any], Path]:
    """Run the lm_eval CLI offline; (its results, the folder of its samples)."""
    if not LM_EVAL.exists():
        pytest.fail(f"lm-eval is not installed ({LM_EVAL}): make setup installs the dev extra")
    out = tmp_path / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    command = [str(LM_EVAL), *args, "--include_path", str(tmp_path / "tasks")]
    command += ["--log_samples", "--output_path", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    [results] = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"], results.parent


def loglikelihoods(samples: Path) -> dict[int, list[float]]:
    [path] = samples.glob("samples_exgen_mc_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["doc_id"]: [float(resp[0][0]) for resp in r["resps"]] for r in rows}


def test_lm_eval_with_its_defaults_equals_its_hf_backend(
    served: HttpDaemon, tmp_path: Path
) -> None:
    write_tasks(tmp_path / "tasks")
    url = f"{served.url}/v1/completions"
    ours, our_samples = lm_eval(
        tmp_path,
        "exgen",
        "--model", "local-completions",
        "--model_args", f"model=demo,base_url={url}",
        "--tasks", "exgen_mc,exgen_gen",
        "--batch_size", "4",
    )  # fmt: skip
    assert set(ours) == {"exgen_mc", "exgen_gen"}
    path = modelstore.resolve_model(None, modelstore.models_dir())
    weights = (
        f"pretrained={path.parent},gguf_file={path.name}"
        if path.suffix == ".gguf"
        else (f"pretrained={path}")
    )
    theirs, their_samples = lm_eval(
        tmp_path,
        "hf",
        "--model", "hf",
        "--model_args", f"{weights},dtype=float32",
        "--tasks", "exgen_mc",
        "--batch_size", "4",
        "--device", "cpu",
    )  # fmt: skip
    assert ours["exgen_mc"]["acc,none"] == theirs["exgen_mc"]["acc,none"]
    mine, reference = loglikelihoods(our_samples), loglikelihoods(their_samples)
    assert mine.keys() == reference.keys() == set(range(len(MC)))
    for doc, values in mine.items():
        assert values == pytest.approx(reference[doc], abs=1e-3), doc


def test_lm_eval_chat_completions(served: HttpDaemon, tmp_path: Path) -> None:
    write_tasks(tmp_path / "tasks")
    results, samples = lm_eval(
        tmp_path,
        "chat",
        "--model", "local-chat-completions",
        "--model_args", f"model=demo,base_url={served.url}/v1/chat/completions",
        "--tasks", "exgen_gen",
        "--apply_chat_template",
    )  # fmt: skip
    assert "exgen_gen" in results
    [path] = samples.glob("samples_exgen_gen_*.jsonl")
    answers = [json.loads(line)["resps"][0][0] for line in path.read_text().splitlines()]
    assert len(answers) == len(GEN) and all(isinstance(a, str) and a for a in answers)
