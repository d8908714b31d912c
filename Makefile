# Two commands for a fresh machine (Python 3.10+):
#   make train   set everything up, then train GenNi-ANN SASRec on the bundled Beauty dataset
#   make test    set everything up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/beauty-ann

.PHONY: setup train test lint clean

$(BIN)/annsample: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel first: a bare `torch` requirement could pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/annsample

train: setup
	$(BIN)/annsample train --config configs/beauty-ann.yaml --out $(RUN)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
