# `make run`: set up .venv and run `kd distill` on the embedded digits data (teacher trained first).
# `make test`: the same set-up plus the test extras, then the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# make run installs the package and what the main job needs; make test adds the test extras (trackers,
# launchers, timm, Hugging Face, ruff, mypy): a fresh venv of 6.0 GB instead of 6.6 GB here (torch's CUDA
# wheel is most of both).
STAMP := $(VENV)/.kd-installed
TEST_STAMP := $(VENV)/.kd-test-installed

.PHONY: run test test-slow lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $(STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]'
	touch $(STAMP) $(TEST_STAMP)

run: $(STAMP)
	$(BIN)/kd distill

# The suite without the `slow` accuracy bars (a few minutes on 2 cores); CI runs both. One worker per core;
# --dist loadfile keeps a test file on one worker, so its module fixtures (trained teachers) are built once;
# --no-loadscope-reorder hands out the files in conftest's order (the longest first), not by test count.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -m "not slow"

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade; and the format) and mypy on kd_cli.
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(TEST_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The accuracy bars on real data (digits, MNIST): several minutes of training.
test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -m slow

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) outputs *.egg-info
