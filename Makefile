# `make run`: set up .venv and run `kd distill` on the embedded digits data (teacher trained first).
# `make test`: same set-up, then the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kd-installed

.PHONY: run test test-slow lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/kd distill

# The suite without the `slow` accuracy bars (a few minutes on 2 cores); CI runs both. One worker per core;
# --dist loadfile keeps a test file on one worker, so its module fixtures (trained teachers) are built once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade; and the format) and mypy on kd_cli.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The accuracy bars on real data (digits, MNIST): several minutes of training.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) outputs *.egg-info
