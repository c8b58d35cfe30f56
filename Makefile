# prunehub: `make demo` runs the whole service on the embedded defaults; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: this machine's local CPU build. An unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install dev demo test lint typecheck browser bench clean

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

bench: dev
	$(PY) bench/pruning_latency.py

clean:
	rm -rf .prunehub .pytest_cache .mypy_cache .ruff_cache
