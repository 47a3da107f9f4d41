"""`make check-accelerator` at smoke size on the CPU: every check runs and reports."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from test_bench_command import with_cheap_compile


@pytest.mark.slow
def test_check_accelerator_smoke_runs_every_check_and_writes_one_table(fashion_mnist, tmp_path):
  del fashion_mnist  # prepared already: the command finds it so
  out = tmp_path / "check.md"
  result = subprocess.run(
      [sys.executable, "-m", "research.check_accelerator", "--smoke", f"--table={out}",
       "--data=/usr/share/datasets/fashion-mnist", f"--torch_python={tmp_path}/no-python"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      # Every run compiles more than it executes; its speed is not what is tested, and the
      # determinism pair compares two runs compiled alike.
      env={**with_cheap_compile(), "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  table = out.read_text()
  assert table.strip() == result.stdout.strip()
  for check in ("Fashion-MNIST prepared | ok", "backend | ok", "seed recipe, float32 | ok",
                "seed recipe, bfloat16 | ok", "ResNet recipe, smoke run | ok",
                "determinism pair (deterministic=True) | ok", "model tests (tests/test_models.py) | ok",
                "PyTorch reference (cpu, eager) | skipped", "torch is not installed"):
    assert check in table, table
  seed = next(line for line in table.splitlines() if "seed recipe, float32" in line)
  cells = [cell.strip() for cell in seed.split("|")]
  assert float(cells[4]) > 0 and 0 < float(cells[5]) <= 1  # images/s, test accuracy
