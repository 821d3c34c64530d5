# Two entry points that set everything up on a fresh machine:
#   make run    runs the example config in the foreground (Ctrl-C stops it)
#   make test   runs lint, type checks and the test suite
# and two for the single executable:
#   make binary       builds dist/runvisor with PyInstaller
#   make test-frozen  builds it and runs the frozen tests against it
# The fault suite runs in `make test` with small counts; at full counts
# (RELIABILITY.md) with:
#   make test-faults-full
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint venv system-deps binary test-frozen test-faults-full clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

$(BIN)/.installed-build: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[build]'
	touch $@

system-deps:
	./scripts/system-deps.sh

run: venv
	$(BIN)/runvisor --config config.example.toml serve

lint: venv
	$(BIN)/ruff check supervisor tests
	$(BIN)/ruff format --check supervisor tests
	$(BIN)/mypy

test: venv system-deps lint
	$(BIN)/pytest

binary: $(BIN)/.installed-build
	PYTHON=$(BIN)/python ./build/build.sh

test-frozen: binary system-deps
	RUNVISOR_BINARY=dist/runvisor $(BIN)/pytest -m frozen

# Counts and the time they take are listed in RELIABILITY.md.
FAULT_COUNTS := RUNVISOR_FAULT_CYCLES=200 RUNVISOR_FAULT_SCHEDULE_CYCLES=100 \
	RUNVISOR_FAULT_FUZZ=20000 RUNVISOR_FAULT_LINE_MB=500 \
	RUNVISOR_FAULT_GRANDCHILDREN=1000 RUNVISOR_FAULT_CONNECTIONS=5000 \
	RUNVISOR_FAULT_PROJECTS=1000

test-faults-full: venv system-deps
	$(FAULT_COUNTS) $(BIN)/pytest -s -o timeout=3000 tests/test_faults_*.py

clean:
	rm -rf $(VENV) build/work dist .pytest_cache .mypy_cache .ruff_cache
