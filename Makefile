# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs hf_turbo with its extras, runs `hf-turbo demo`
#   make test   same venv, checks the import layers (lint-imports), runs the test suite (CI: .ci/run)
# On a machine without an NVIDIA GPU the CPU build of torch is installed first (torch==2.13.0,
# a local wheel on the project's machines); with a GPU, pip resolves torch>=2.11 normally.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_turbo-installed
PYTEST_ARGS ?=

.PHONY: demo test install bench lint clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch>=2.11 (CUDA build)"; \
		$(PY) -m pip install --quiet "torch>=2.11"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build torch==2.13.0"; \
		$(PY) -m pip install --quiet "torch==2.13.0"; \
	fi
	$(PY) -m pip install --quiet -e ".[serve,eval,bench,dev,ray,quant]"
	@# the CPU extension is compiled here, once, rather than inside the first process that needs it
	-$(PY) -c 'from hf_turbo.backends.cpu import ext; ext.build_ahead()'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hf-turbo demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/hf-turbo bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
