# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
# Two workers (the machine's two cores); a test file stays on one worker, so its
# module-wide fixtures (a trained workdir, say) are built once.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: train test test-fast data postgres bench bench-compare clean

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

# PostgreSQL for the study tests, which start their own server on 127.0.0.1: Debian's
# package, installed where it is missing and this user may (root with apt-get). Elsewhere
# those tests skip and say why; nothing here fails the build.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Debian's postgresql package (for the study tests)"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; }; } || \
	  echo "note: apt-get could not install postgresql; the PostgreSQL study tests will skip."; \
	else echo "note: PostgreSQL is not installed and only root can apt-get install postgresql;" \
	  "the PostgreSQL study tests will skip."; fi

train: data
	$(BIN)/python -m research.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: data postgres
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Skips the slow end-to-end tests (CI runs them).
test-fast: data postgres
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

# Benchmarks. `make bench`: our speed and its fraction of the machine's peak.
# `make bench-compare`: side by side with the Keras and PyTorch references in ../shared/bench,
# whose frameworks live in environments of their own under build/ (never in .venv).
SHARED ?= ../shared
BENCH_ENV := build/bench-env
BENCH_ROUNDS ?= 3
BENCH_EPOCHS ?= 3
BENCH_ARGS ?=

bench: data
	$(BIN)/python -m research.benchmark --recipes=seed,seed_bf16,resnet20 $(BENCH_ARGS)

$(BENCH_ENV)/tf/.installed:
	$(PYTHON) -m venv $(BENCH_ENV)/tf
	$(BENCH_ENV)/tf/bin/python -m pip install --quiet --disable-pip-version-check \
	    "tensorflow-cpu==$$(sed -n 's/^tensorflow[-_]cpu==//p' requirements.lock)"
	touch $@

$(BENCH_ENV)/torch/.installed:
	$(PYTHON) -m venv $(BENCH_ENV)/torch
	$(BENCH_ENV)/torch/bin/python -m pip install --quiet --disable-pip-version-check \
	    torch==2.13.0 numpy
	touch $@

bench-compare: data $(BENCH_ENV)/tf/.installed $(BENCH_ENV)/torch/.installed
	$(BIN)/python -m research.bench_compare --shared=$(SHARED)/bench \
	    --keras_python=$(BENCH_ENV)/tf/bin/python --torch_python=$(BENCH_ENV)/torch/bin/python \
	    --rounds=$(BENCH_ROUNDS) --epochs=$(BENCH_EPOCHS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build runs
