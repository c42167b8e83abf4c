# imagefs: `make demo` to see it work, `make test` to check everything.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all bootstrap test lint layering typecheck pytest fuzz demo bench format clean

all: test

bootstrap:
	@scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/bin/ruff check imagefs tests scripts
	$(VENV)/bin/ruff format --check imagefs tests scripts

typecheck: bootstrap
	$(VENV)/bin/mypy

# The layering contract in pyproject.toml ([tool.importlinter]): dependencies
# point down the data flow, and only imagefs.daemon imports pyfuse3 and trio.
layering: bootstrap
	$(VENV)/bin/lint-imports

pytest: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint layering typecheck pytest

# Long runs of what `make test` runs briefly: hypothesis targets with
# FUZZ_EXAMPLES examples each (fresh ones every run), the hostile corpus at a
# million entries, and STRESS_SECONDS of 16 parallel readers.
FUZZ_EXAMPLES ?= 20000
STRESS_SECONDS ?= 60
fuzz: bootstrap
	IMAGEFS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) IMAGEFS_HOSTILE_SCALE=full \
	IMAGEFS_STRESS_SECONDS=$(STRESS_SECONDS) \
	$(PY) -m pytest -s --hypothesis-show-statistics tests/test_fuzz.py tests/test_bbolt.py \
	tests/test_hostile.py \
	tests/test_stress.py $(PYTEST_ARGS)

format: bootstrap
	$(VENV)/bin/ruff format imagefs tests scripts
	$(VENV)/bin/ruff check --fix imagefs tests scripts

demo: bootstrap
	$(PY) scripts/demo.py

# Figures, not a test: builds images from /usr once (BENCH_DIR), then measures.
bench: bootstrap
	$(PY) scripts/bench.py
	$(PY) scripts/bench_registry.py
	$(PY) scripts/bench_stores.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
