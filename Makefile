# Quick start: `make demo` (set up + run the default job), `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch from the pinned release; without it pip would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow clean

$(BIN)/drbench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/drbench

demo: setup
	$(BIN)/drbench list ops
	$(BIN)/drbench bench-ops --batch 8 --channels 116 --size 28 --regions 8 --budget 2

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

# pytest exits 5 when no test carries the marker: not a failure.
test-slow: setup
	$(BIN)/python -m pytest -m slow -q || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
