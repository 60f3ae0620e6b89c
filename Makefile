# `make demo`: set up .venv and run the main job on the CPU with the default backend.
# `make test`: set up .venv and run every test (GPU-only cases skip here, with the reason).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml plugins/te/pyproject.toml plugins/triton/pyproject.toml plugins/kitchen/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_CPU)
	$(BIN)/pip install --quiet -e ".[dev]" -e plugins/triton -e plugins/kitchen -e plugins/te
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnplug backends
	$(BIN)/attnplug plan examples/qwen3_next_hybrid.toml
	$(BIN)/attnplug train examples/qwen3_next_hybrid.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check attnplug plugins tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
