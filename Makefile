# imagefs: `make demo` to see it work, `make test` to check everything.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all bootstrap test lint typecheck pytest demo bench format clean

all: test

bootstrap:
	@scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/bin/ruff check imagefs tests scripts
	$(VENV)/bin/ruff format --check imagefs tests scripts

typecheck: bootstrap
	$(VENV)/bin/mypy

pytest: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

format: bootstrap
	$(VENV)/bin/ruff format imagefs tests scripts
	$(VENV)/bin/ruff check --fix imagefs tests scripts

demo: bootstrap
	$(PY) scripts/demo.py

# Figures, not a test: builds images from /usr once (BENCH_DIR), then measures.
bench: bootstrap
	$(PY) scripts/bench.py
	$(PY) scripts/bench_registry.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
