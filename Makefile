# Quick start: `make demo` (set up + run the default job), `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch from the pinned release; without it pip would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Triton for the "triton" region_conv2d implementation, whose tests run in Triton's interpreter on the CPU; pinned
# to the release that CUDA builds of torch 2.11 bring with them.
TRITON_SPEC ?= triton==3.6.0

.PHONY: setup demo test test-slow test-timing clean

$(BIN)/drbench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/drbench

demo: setup
	$(BIN)/drbench run suites/quick.yaml
	$(BIN)/drbench report results/quick

test: setup
	$(BIN)/python -m pytest -m "not slow and not timing" -q

# pytest exits 5 when no test carries the marker: not a failure.
test-slow: setup
	$(BIN)/python -m pytest -m "slow and not timing" -q || [ $$? -eq 5 ]

# Real latency comparisons between runs: meaningful only on a quiet machine, so not part of CI.
test-timing: setup
	$(BIN)/python -m pytest -m timing -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
