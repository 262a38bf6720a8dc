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

# The beacon path compiled by mypyc (setup.py), rebuilt whenever any edgeproxy source
# changes (setup.py alone lists what is compiled; ~20 s). Without a C compiler it runs as
# plain Python, slower; EDGEPROXY_REQUIRE_COMPILED=1 (CI) makes that an error.
SOURCES := $(filter-out edgeproxy/_build.py,$(wildcard edgeproxy/*.py edgeproxy/*/*.py edgeproxy/*/*.c))

$(BIN)/.compiled: $(BIN)/.installed setup.py $(SOURCES)
	@rm -f edgeproxy/*.so edgeproxy/*/*.so edgeproxy/_build.py
	@if EDGEPROXY_COMPILE=1 $(BIN)/python setup.py -q build_ext --inplace >$(BIN)/compile.log 2>&1; \
	then echo "edgeproxy: beacon path compiled (mypyc)"; \
	else rm -f edgeproxy/*.so edgeproxy/*/*.so edgeproxy/_build.py; \
	  echo "edgeproxy: the beacon path could not be compiled (see $(BIN)/compile.log): plain Python"; \
	  if [ "$$EDGEPROXY_REQUIRE_COMPILED" = 1 ]; then cat $(BIN)/compile.log; exit 1; fi; fi
	@touch $@

demo: $(BIN)/.compiled
	$(BIN)/edgeproxy demo

lint: $(BIN)/.compiled
	$(BIN)/ruff check edgeproxy tests bench setup.py
	$(BIN)/ruff format --check edgeproxy tests bench setup.py
	$(BIN)/mypy

# The client connections' tests again on tls/transport.py, the Python ones that serve where
# the C ones (tls/native.py) can't.
test: lint
	$(BIN)/python -m pytest
	EDGEPROXY_PY_TRANSPORT=1 $(BIN)/python -m pytest -q tests/integration/test_tls.py \
	  tests/integration/test_hostile.py tests/integration/test_forwarding.py \
	  tests/integration/test_memory.py

# On demand: edgeproxy vs nginx on this machine (installs nginx, wrk and valgrind when
# missing), then the worker's instructions per operation (deterministic, for A/B of builds).
bench: $(BIN)/.compiled
	$(BIN)/python bench/run.py
	$(BIN)/python bench/certs_scale.py
	$(BIN)/python bench/instructions.py

# CI only proves the scripts run; the numbers mean nothing on a busy machine.
bench-smoke: $(BIN)/.compiled
	$(BIN)/python bench/run.py --smoke
	$(BIN)/python bench/certs_scale.py --quick
	$(BIN)/python bench/instructions.py --smoke
	$(BIN)/python bench/cpu_by_object.py --smoke

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache build
	rm -f edgeproxy/*.so edgeproxy/*/*.so edgeproxy/_build.py
