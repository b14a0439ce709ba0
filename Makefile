# The two quickstart commands: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench services

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "queuegate needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP) services
	$(BIN)/queuegate demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Three processes (pytest-xdist): the tests mostly wait on the services and providers, so the
# suite takes well under its time alone on 2 cores. Each module runs whole on one of them, in
# order, as it does alone (--dist loadfile: module fixtures, private instances and fixed ports
# stay within it); the chaos modules, collected first and the longest, start first
# (--no-loadscope-reorder). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 3

test: lint services
	$(BIN)/pytest --numprocesses $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

services:  # start the local services that are not answering
	@scripts/services

bench: $(STAMP)
	$(BIN)/python -m bench
