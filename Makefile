# Two entry points that set everything up on a fresh machine:
#   make run    runs the example config in the foreground (Ctrl-C stops it)
#   make test   runs lint, type checks and the test suite
# and two for the single executable:
#   make binary       builds dist/runvisor with PyInstaller
#   make test-frozen  builds it and runs the frozen tests against it
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint venv system-deps binary test-frozen clean

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

clean:
	rm -rf $(VENV) build/work dist .pytest_cache .mypy_cache .ruff_cache
