# The README's commands. Each creates .venv when missing and installs what it needs, so a
# fresh clone on a fresh machine needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DATASET ?= python-docs
QUERY ?= what does the with statement do

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup index test test-fast bench bench-memory clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.core-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(VENV)/.core-installed $@

setup: $(VENV)/.dev-installed

index: $(VENV)/.core-installed
	$(BIN)/embedfleet index $(DATASET) --collection $(DATASET)
	$(BIN)/embedfleet search "$(QUERY)" --collection $(DATASET) -k 3

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest

test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/throughput.py python-docs
	$(BIN)/python benchmarks/incremental.py
	$(BIN)/python benchmarks/jobs.py
	$(BIN)/python benchmarks/search_cold_start.py

bench-memory: $(VENV)/.dev-installed  # 50k chunks on 2 cores: ~10 min (bf16, AMX) to ~45 min (fp32, AVX2)
	$(BIN)/python benchmarks/worker_memory.py --synthetic 50000

clean:
	rm -rf $(VENV) embedfleet-data .pytest_cache
