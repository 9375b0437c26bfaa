# Entry points for a fresh machine: `make run` (default simulation on the embedded digits data),
# `make test` (all tests) and `make test-fast` (all but the slow ones, < 3 minutes on 2 cores).
# Each bootstraps .venv idempotently.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint typecheck check docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: these exact builds are served from local disk here.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

run: setup
	$(VENV)/bin/splitmix simulate

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests/unit tests/integration

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

check: lint typecheck

docs: setup  # regenerate the key table of docs/configuration.md from the config dataclasses
	$(PY) -m splitmix.config --update-docs docs/configuration.md

bench: setup
	$(PY) bench/simulation_efficiency.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
