# Two entry points that set everything up on a fresh machine:
#   make run    runs the example config in the foreground (Ctrl-C stops it)
#   make test   runs lint, type checks and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint venv system-deps binary clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

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

clean:
	rm -rf $(VENV) build/work dist .pytest_cache .mypy_cache .ruff_cache
