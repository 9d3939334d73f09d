# Entry points named in README.md. Everything runs from a project virtualenv in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint typecheck services bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: optimize the math_qa example on the simulated LM (threads + SQLite)
demo: install
	$(VENV)/bin/dmipro demo

## test: install and start Redis and PostgreSQL, then lint, type-check and run every test
test: install
	bash scripts/test.sh

## check: lint and type-check only
check: install lint typecheck

lint:
	$(VENV)/bin/ruff check dmipro tests examples bench

typecheck:
	$(VENV)/bin/mypy

services:
	bash scripts/services.sh

bench: install
	$(PY) bench/evaluate_throughput.py
	$(PY) bench/compare_dspy.py
	$(PY) bench/scaling.py

clean:
	rm -rf .dmipro .pytest_cache .mypy_cache .ruff_cache
