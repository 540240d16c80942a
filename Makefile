# Two commands on a fresh clone: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEMO_ARGS ?=
PIPELINE_OUT ?= runs/pipeline

.PHONY: demo pipeline reproduce reproduce-full bench test test-all test-gpu lint format services tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# re-install only when the project's dependencies change
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed-dev
	$(PIP) -e '.[dev,bench]'
	touch $@

# the embedded stack + the demo pipeline over REST; DEMO_ARGS=--no-wait exits once it succeeded
demo: $(VENV)/.installed
	$(BIN)/erpd-hub demo $(DEMO_ARGS)

# the same ERPD round with the training core alone (no API, no worker) -> runs/pipeline/
pipeline: $(VENV)/.installed
	$(BIN)/erpd pipeline --out $(PIPELINE_OUT) --config configs/demo.yaml

# the paper's experiments at tiny scale -> runs/reproduce-*/report.md (re-running reuses runs)
reproduce: $(VENV)/.installed
	$(BIN)/erpd reproduce --out runs/reproduce-quick --preset quick

reproduce-full: $(VENV)/.installed
	$(BIN)/erpd reproduce --out runs/reproduce-full --preset full

# benchmarks print rates against a baseline measured in the same run (never timed tests)
bench: $(VENV)/.installed-bench services tools
	$(BIN)/python benchmarks/gemm_peak.py
	$(BIN)/python benchmarks/stage1_vs_trl.py
	$(BIN)/python benchmarks/stage2_cost.py
	$(BIN)/python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/frozen_models.py
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/metric_inserts.py
	$(BIN)/python benchmarks/worker_sink.py
	$(BIN)/python benchmarks/api_latency.py
	$(BIN)/python benchmarks/dispatch.py
	$(BIN)/python benchmarks/dashboard_first_chart.py

test: lint services tools
	$(BIN)/python -m pytest

test-all: $(VENV)/.installed-dev services tools
	$(BIN)/python -m pytest -m "not gpu"

test-gpu: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m gpu

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

services:
	@scripts/services.sh

# Debian's chromium (the dashboard's browser test) and docker-compose (validates the compose file)
tools:
	@scripts/test-tools.sh

clean:
	rm -rf $(VENV) runs .erpd .pytest_cache .ruff_cache
