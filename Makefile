# `make demo` and `make test` work on a fresh machine: each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_DIR     ?= demo-run
FULL_DIR     ?= demo-run-full

.PHONY: demo demo-full test test-slow bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "== installing vtfusion into $(VENV): about 8 GB (torch with CUDA, faiss-gpu, transformers, streamlit); several minutes"
	$(BIN)/pip install --progress-bar on -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@echo "== installing vtfusion with its dev extras into $(VENV): about 8 GB; several minutes"
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $@ $(VENV)/.installed

# the first run: `vtfusion demo`'s defaults (4,000 items, 16 joint + 7 reranker epochs: 9.4
# minutes on 2 quiet cores); demo-full: the full-length schedule (16 + 8 epochs, 10.1 minutes)
demo: $(VENV)/.installed
	$(BIN)/vtfusion demo --out $(DEMO_DIR)

demo-full: $(VENV)/.installed
	$(BIN)/vtfusion demo --out $(FULL_DIR) --epochs 16 --rerank-epochs 8

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
	rm -rf $(VENV) $(DEMO_DIR) $(FULL_DIR)
