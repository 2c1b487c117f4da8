# stockhold — `make run` serves the API, `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint format bench clean help

help:
	@echo "make run    serve on http://127.0.0.1:8000 (embedded Redis + PostgreSQL unless REDIS_URL / DATABASE_URL are set)"
	@echo "make test   run the test suite (embedded servers unless TEST_REDIS_URL / TEST_DATABASE_URL are set)"
	@echo "make lint   ruff (lint + format check) and mypy"
	@echo "make bench  write-behind benchmark: reserve rate, lag at 2,000/s, worker drain rate (~90 s, 127.0.0.1 only)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || { \
	  echo "stockhold needs Python >= 3.11 with the venv module (Debian: apt-get install python3-venv);"; \
	  echo "set PYTHON=/path/to/python3.11 if it is not the default python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: $(STAMP)
	$(BIN)/stockhold serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix app tests bench
	$(BIN)/ruff format app tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.writebehind

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
