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

.PHONY: setup setup-openvino index test test-fast test-openvino bench bench-memory bench-openvino clean

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

# sentence-transformers' OpenVINO backend lives in a venv of its own: its extra moves transformers
# back to 5.5.4 (optimum-intel's cap), under which the onnx backend's export does not trace.
OPENVINO_VENV ?= .venv-openvino

$(OPENVINO_VENV)/.openvino-installed: pyproject.toml
	test -x $(OPENVINO_VENV)/bin/python || $(PYTHON) -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/pip install --quiet $(TORCH)
	$(OPENVINO_VENV)/bin/pip install --quiet -e '.[openvino]' 'pytest>=8' 'pytest-timeout>=2.3'
	touch $@

setup-openvino: $(OPENVINO_VENV)/.openvino-installed

index: $(VENV)/.core-installed
	$(BIN)/embedfleet index $(DATASET) --collection $(DATASET)
	$(BIN)/embedfleet search "$(QUERY)" --collection $(DATASET) -k 3

# The OpenVINO backend's tests run in its own venv (its extra moves transformers back; README).
test: $(VENV)/.dev-installed $(OPENVINO_VENV)/.openvino-installed
	$(BIN)/python -m pytest
	$(OPENVINO_VENV)/bin/python -m pytest tests/test_openvino.py

test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m "not slow"

test-openvino: $(OPENVINO_VENV)/.openvino-installed
	$(OPENVINO_VENV)/bin/python -m pytest tests/test_openvino.py

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/throughput.py python-docs
	$(BIN)/python benchmarks/incremental.py
	$(BIN)/python benchmarks/jobs.py
	$(BIN)/python benchmarks/search_cold_start.py

bench-openvino: $(OPENVINO_VENV)/.openvino-installed  # the backends table with its openvino rows
	$(OPENVINO_VENV)/bin/python benchmarks/throughput.py --backends --limit 300

bench-memory: $(VENV)/.dev-installed  # 50k chunks on 2 cores: ~10 min (bf16, AMX) to ~45 min (fp32, AVX2)
	$(BIN)/python benchmarks/worker_memory.py --synthetic 50000

clean:
	rm -rf $(VENV) $(OPENVINO_VENV) embedfleet-data .pytest_cache
