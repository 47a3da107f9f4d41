# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# ACCEL picks JAX's wheels: cpu (default), cuda12 / cuda13 (NVIDIA GPUs, CUDA 12 or 13
# drivers) or tpu (Cloud TPU VMs); e.g. `make train ACCEL=cuda12`. See docs/accelerators.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ACCEL ?= cpu
ACCELS := cpu cuda12 cuda13 tpu
$(if $(filter $(ACCEL),$(ACCELS)),,$(error ACCEL=$(ACCEL) is not accepted: use one of $(ACCELS)))
# One stamp per ACCEL: a venv holds one target's wheels, and switching ACCEL rebuilds it.
STAMP := $(VENV)/.installed-$(ACCEL)
ACCEL_LOCK := $(if $(filter cpu,$(ACCEL)),,requirements-$(ACCEL).lock)
ACCEL_INSTALL := $(if $(ACCEL_LOCK),-c $(ACCEL_LOCK) 'jax[$(ACCEL)]')
WORKDIR ?= runs/default
CONFIG ?= configs/default.py
# Two workers (the machine's two cores); a test file stays on one worker, so its
# module-wide fixtures (a trained workdir, say) are built once. Compiled programs are
# shared by every test and run through JAX's compilation cache (tests/conftest.py). Files
# are handed out in tests/conftest.py's order (START_FIRST), not xdist's.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: train test test-fast data postgres bench bench-compare bench-input check-accelerator clean

# What the machine must provide, checked before anything is created: Python 3.11+ and
# its venv module with ensurepip (Debian and Ubuntu ship that part separately).
define CHECK_PYTHON
import sys
found = "%d.%d" % sys.version_info[:2]
if sys.version_info < (3, 11):
    sys.exit("error: Python 3.11+ is needed; $(PYTHON) is Python " + found + ". Install a newer "
             "one (Debian/Ubuntu: apt-get install python3.11 python3.11-venv) and name it: "
             "make PYTHON=python3.11 ...")
try:
    import ensurepip, venv
except ImportError:
    sys.exit("error: $(PYTHON) (Python " + found + ") cannot create virtual environments: its "
             "venv/ensurepip part is missing. Install it (Debian/Ubuntu, as root: apt-get install "
             "python3-venv, or python" + found + "-venv) and rerun make.")
endef
export CHECK_PYTHON

# The environment: pinned versions from requirements.lock (and the ACCEL's lock),
# project installed editable. uv installs them: in parallel, and compiled to bytecode as
# pip would (pip took 48 s on 2 cores, uv 28 s with nothing in its cache). uv reads no pip.conf:
# behind a package mirror, set UV_DEFAULT_INDEX (docs/troubleshooting.md).
UV := uv==0.13.9
$(STAMP): pyproject.toml requirements.lock $(ACCEL_LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found. Install Python 3.11+ (Debian/Ubuntu: apt-get install python3 python3-venv), or name one: make PYTHON=python3.12" >&2; exit 2; }
	@$(PYTHON) -c "$$CHECK_PYTHON"
	@for other in $(VENV)/.installed-*; do \
	  if [ -e "$$other" ] && [ "$$other" != "$(STAMP)" ]; then \
	    echo "$(VENV) holds $${other#$(VENV)/.installed-} wheels: rebuilding it for ACCEL=$(ACCEL)"; \
	    rm -rf $(VENV); break; \
	  fi; \
	done
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(UV)"
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -c requirements.lock \
	    $(ACCEL_INSTALL) -e '.[test]'
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

# The bench-compare test runs the Keras reference of $(SHARED)/bench.
test: data postgres
	SHARED_BENCH=$(SHARED)/bench $(BIN)/python -m pytest $(PYTEST_ARGS)

# A quick signal while working: skips the tests marked slow (end-to-end runs, the
# compile-bound ResNets, the benchmarks), which `make test` runs.
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

# The streamed input's speed (docs/input.md): img/s of the old thread path and of 1 and 2
# decoding processes, per core, and the trainer's main-thread ceiling, on 500x375 photographs.
bench-input: $(STAMP)
	$(BIN)/python -m research.bench_input $(BENCH_ARGS)

# An accelerator machine checked end to end (docs/accelerators.md): one table, in
# build/check_accelerator.md. DATA: a folder of Fashion-MNIST's original .gz files.
DATA ?= /usr/share/datasets/fashion-mnist
check-accelerator: $(STAMP)
	$(BIN)/python -m research.check_accelerator --data=$(DATA) --shared=$(SHARED)/bench $(CHECK_ARGS)

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
