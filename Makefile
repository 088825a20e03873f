# The only entry points. Each target does its own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch: a bare `torch` requirement pulls a CUDA build of several GB.
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for torch alone, e.g. --extra-index-url for the CPU wheels elsewhere.
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv browser test lint demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The dashboard's browser tests drive Debian's Chromium (Playwright's own browser download needs
# a network CI does not have); installed once, only when missing.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: venv browser
	$(BIN)/ruff check .
	$(BIN)/mypy core store api worker cli
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy core store api worker cli

demo: venv
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .amid .demo
