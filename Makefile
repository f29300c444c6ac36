# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup setup-dev bench clean

setup:
	@VENV=$(VENV) bash scripts/setup.sh

setup-dev:
	@VENV=$(VENV) bash scripts/setup.sh dev

demo: setup
	$(BIN)/nnfit demo

test: setup-dev
	$(BIN)/python -m pytest -q -n 2  # two workers: the suite takes about 6 minutes on 2 cores, 9 in one process

bench: setup
	$(BIN)/python bench/core.py

clean:
	rm -rf runs .pytest_cache
