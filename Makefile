# `make demo` and `make test` work on a fresh machine: each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_DIR     ?= demo-run
DEMO_EPOCHS  ?= 16

.PHONY: demo test test-slow bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/vtfusion demo --out $(DEMO_DIR) --epochs $(DEMO_EPOCHS)

test: $(VENV)/.installed-dev
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.installed
	$(BIN)/python bench/ingest.py --n 1000
	$(BIN)/python bench/retrieval.py --sizes 100000,1000000
	$(BIN)/python bench/filtered.py --n 100000
	$(BIN)/python bench/rerank.py
	$(BIN)/python bench/e2e.py --n 100000
	$(BIN)/python bench/forward.py --batch 64 --steps 5

clean:
	rm -rf $(VENV) $(DEMO_DIR)
