# Two entry points on a fresh machine: `make demo` and `make test`. Both create the
# virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build is enough for the demo and the tests; GPU users install their CUDA torch
# first (any release in pyproject's range) and pip keeps it.
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	# DeepSpeed's setup imports torch, so it must build against the torch just installed.
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/divico run

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
