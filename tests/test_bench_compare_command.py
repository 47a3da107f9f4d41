"""`make bench-compare` end to end at smoke size: the command the Makefile runs, with our
two training runs shrunk by flags and the Keras reference (TensorFlow is in the lock)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from test_bench_command import QUICK_TRAINING


def _shared_bench() -> str:
  """The reference scripts' folder: the Makefile's SHARED (../shared) /bench."""
  default = os.path.join(REPO, "..", "shared", "bench")
  folder = os.path.abspath(os.environ.get("SHARED_BENCH", default))
  if not os.path.exists(os.path.join(folder, "keras_seed.py")):
    pytest.skip(f"no keras_seed.py in {folder}: set SHARED_BENCH to the shared/bench folder")
  return folder


@pytest.mark.slow
def test_make_bench_compare_runs_ours_and_the_keras_reference(tmp_path):
  # TensorFlow is in requirements.lock: this environment's Python runs the Keras peer.
  out = tmp_path / "build"
  command = [sys.executable, "-m", "research.bench_compare", f"--shared={_shared_bench()}",
             f"--keras_python={sys.executable}", "--peers=keras", "--rounds=1", "--epochs=2",
             "--batch_sizes=32", "--throughput_steps=10", f"--out={out}",
             *[f"--train_flag={flag}" for flag in QUICK_TRAINING]]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "bench_compare.json") as f:
    report = json.load(f)
  [round_one] = report["rounds"]
  assert set(round_one) == {"ours (JAX)", "ours (JAX, bf16)", "Keras/TF"}
  for name, measured in round_one.items():
    assert measured["steady_epoch_s"] > 0 and measured["peak_rss_mb"] > 100, name
  # Ours trained on 1,280 examples; the reference on all 60,000, as it always does.
  assert 0.8 < round_one["Keras/TF"]["test_accuracy"] <= 1
  assert 0.3 < round_one["ours (JAX)"]["test_accuracy"] <= 1
  assert set(report["throughput"]) == set(round_one)
  for name, rates in report["throughput"].items():
    assert list(rates) == ["32"] and rates["32"] > 0, name
  table = (out / "bench_compare.md").read_text()
  assert "| Keras/TF ÷ ours (JAX) | Keras/TF ÷ ours (JAX, bf16) |" in table
  assert "nan" not in table and "PyTorch" not in table


def test_bench_compare_refuses_an_unknown_peer(tmp_path):
  result = subprocess.run([sys.executable, "-m", "research.bench_compare", "--peers=jax",
                           f"--out={tmp_path / 'build'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2 and "--peers=jax is not accepted" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "build").exists()
