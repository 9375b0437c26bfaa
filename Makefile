# Two entry points for a fresh machine: `make run` (default simulation on the
# embedded digits data) and `make test`. Both bootstrap .venv idempotently.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

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

bench: setup
	$(PY) bench/simulation_efficiency.py

clean:
	rm -rf $(VENV) runs .pytest_cache
