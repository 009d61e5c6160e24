# The verbs people type. Every target builds its own virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-e2e test-all lint format demo up bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## make test: every test but the end-to-end runs (marked slow: real training jobs through
## workers, several processes, the CLI's subprocesses), about 3 minutes on 2 cores; its files
## spread over TEST_WORKERS processes (each module keeps its fixtures in one process), handed
## out longest first (tests/conftest.py's SLOW_FIRST, and E2E_SLOW_FIRST under -m slow;
## --no-loadscope-reorder keeps that order, which xdist would otherwise replace by the number
## of tests per file)
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST) -m "not slow"

## make test-e2e: the end-to-end runs `make test` leaves out, about 13 minutes on 2 cores
## (docs/performance.md, "The test suite"); CI (.ci/run) runs both
test-e2e: $(STAMP)
	$(PYTEST) -m slow

## make test-all: both tiers, one after the other
test-all: test test-e2e

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## make demo: the main job on the embedded default; prints where the student is
demo: $(STAMP)
	$(VENV)/bin/sharp demo

## make up: the embedded service (SQLite, embedded Redis, one worker, the API)
up: $(STAMP)
	$(VENV)/bin/sharp up

bench: $(STAMP)
	$(PY) -m bench.step --preset tiny-cpu

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var runs
