# `make test` and `make demo` work on a fresh machine: they create .venv unless a virtualenv is active.
# torch is pinned through constraints.txt so pip takes the local CPU wheel, not a multi-GB CUDA build.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := python
else
PY := .venv/bin/python
endif
PIP := $(PY) -m pip
STAMP := .venv/.installed

.PHONY: setup test lint format demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,plot]"
	@mkdir -p .venv && touch $(STAMP)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: setup lint
	$(PY) -m pytest -q -ra

demo: setup
	$(PY) -m seqrec_hf.cli demo --output-dir outputs/demo

clean:
	rm -rf .venv outputs .pytest_cache .ruff_cache
