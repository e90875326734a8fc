# Two entry points on a fresh machine: `make demo` and `make test`. Both create the
# virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build is enough for the demo and the tests; GPU users install their CUDA torch
# first (any release in pyproject's range) and pip keeps it.
TORCH ?= torch==2.13.0
LMMS_EVAL := 0.7.3
LMMS_EVAL_NEEDS := loguru sacrebleu evaluate datasets pytz tenacity pytablewriter "filelock<4"

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	# DeepSpeed's setup imports torch, so it must build against the torch just installed.
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	# The `lmms` extra for the plugin's tests, without the packages lmms-eval's evaluator never
	# imports: its torchvision would replace the CPU torch (PyPI's does not load beside it).
	$(PY) -m pip install -q --no-deps "lmms-eval==$(LMMS_EVAL)"
	$(PY) -m pip install -q $(LMMS_EVAL_NEEDS)
	touch $@

demo: setup
	$(VENV)/bin/divico run

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
