# SEED is drawn once per make run (command-line SEED=N overrides it).
# Two commands on a fresh machine (see README.md):
#   make demo   create .venv (torch==2.13.0 CPU first, then graphopt with its extras) and run `graphopt demo`
#   make test   the same setup, then the whole test suite (hypothesis "ci" profile, seed printed)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')

.PHONY: setup demo test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/graphopt demo

# pytest exits 5 when it collects no test: make treats every non-zero status as a failure.
# The test files run on one pytest-xdist worker per core (at most 4), a file's tests on one worker.
test: setup
	@echo "hypothesis seed: $(SEED)  (rerun with: make test SEED=$(SEED))"
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile \
		--hypothesis-seed=$(SEED) --durations=15

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.bench-installed
	for b in fusion kernels int8 onnx pruning compile; do \
	  [ -f bench/$$b.py ] && $(BIN)/python -m bench.$$b || exit 1; done
