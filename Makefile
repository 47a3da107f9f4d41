# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
PYTEST_ARGS ?=

.PHONY: train test test-fast data bench bench-compare clean

# The environment: pinned versions from requirements.lock, project installed editable.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==26.3"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $@

# Fashion-MNIST prepared by TFDS: offline from Debian's files when possible.
data: $(STAMP)
	$(BIN)/python -m research.prepare_data --dataset=fashion_mnist

train: data
	$(BIN)/python -m research.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Skips the slow end-to-end tests (CI runs them).
test-fast: data
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build runs
