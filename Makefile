# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-smoke clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/edgeproxy demo

lint: $(BIN)/.installed
	$(BIN)/ruff check edgeproxy tests bench
	$(BIN)/ruff format --check edgeproxy tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# On demand: edgeproxy vs nginx on this machine (installs nginx and wrk when missing).
bench: $(BIN)/.installed
	$(BIN)/python bench/run.py
	$(BIN)/python bench/certs_scale.py

# CI only proves the scripts run; the numbers mean nothing on a busy machine.
bench-smoke: $(BIN)/.installed
	$(BIN)/python bench/run.py --smoke
	$(BIN)/python bench/certs_scale.py --quick

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
