"""`make bench-compare` end to end at smoke size: the command the Makefile runs, with our
two training runs shrunk by flags and the Keras reference (TensorFlow is in the lock)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from test_bench_command import QUICK_THROUGHPUT, QUICK_TRAINING, with_cheap_compile


def _shared_bench() -> str:
  """The reference scripts' folder: the Makefile's SHARED (../shared) /bench."""
  default = os.path.join(REPO, "..", "shared", "bench")
  folder = os.path.abspath(os.environ.get("SHARED_BENCH", default))
  if not os.path.exists(os.path.join(folder, "keras_seed.py")):
    pytest.skip(f"no keras_seed.py in {folder}: set SHARED_BENCH to the shared/bench folder")
  return folder


# The Keras reference reads Debian's files from a fixed folder and has no flag for fewer
# examples; 2 epochs (its minimum here: epoch 1 compiles) of all 60,000 are minutes of
# CPU. Its script runs unchanged but for that folder, on the first KERAS_TRAIN training
# and KERAS_TEST test examples of the same files.
KERAS_DATA = "/usr/share/datasets/fashion-mnist"
KERAS_TRAIN, KERAS_TEST = 6000, 1000  # 0.826 test accuracy after 2 epochs


def _subset_idx(source: str, target: str, count: int) -> None:
  """The first `count` records of an IDX .gz file (its header with the count changed)."""
  import gzip

  import numpy as np

  with gzip.open(source, "rb") as f:
    raw = f.read()
  dims = raw[3]  # magic: 0, 0, dtype, number of dimensions; then one 4-byte size each
  shape = np.frombuffer(raw[4:4 + 4 * dims], ">u4")
  record = int(np.prod(shape[1:]))
  header = raw[:4] + np.array([count, *shape[1:]], ">u4").tobytes()
  with gzip.open(target, "wb") as f:
    f.write(header + raw[4 + 4 * dims:4 + 4 * dims + count * record])


def _smaller_keras_reference(shared: str, folder) -> str:
  """A copy of `shared` whose keras_seed.py reads a subset of the dataset from `folder`."""
  data = folder / "fashion-mnist"
  data.mkdir(parents=True)
  for split, count in [("train", KERAS_TRAIN), ("t10k", KERAS_TEST)]:
    for part in ("images-idx3", "labels-idx1"):
      name = f"{split}-{part}-ubyte.gz"
      _subset_idx(os.path.join(KERAS_DATA, name), str(data / name), count)
  with open(os.path.join(shared, "keras_seed.py")) as f:
    script = f.read()
  line = f'DATA = "{KERAS_DATA}"'
  assert script.count(line) == 1, f"keras_seed.py no longer sets {line}"
  bench = folder / "bench"
  bench.mkdir()
  (bench / "keras_seed.py").write_text(script.replace(line, f'DATA = "{data}"'))
  return str(bench)


@pytest.mark.slow
def test_make_bench_compare_runs_ours_and_the_keras_reference(tmp_path):
  # TensorFlow is in requirements.lock: this environment's Python runs the Keras peer.
  shared = _smaller_keras_reference(_shared_bench(), tmp_path / "shared")
  out = tmp_path / "build"
  command = [sys.executable, "-m", "research.bench_compare", f"--shared={shared}",
             f"--keras_python={sys.executable}", "--peers=keras", "--rounds=1", "--epochs=2",
             "--batch_sizes=32", "--throughput_steps=10", QUICK_THROUGHPUT, f"--out={out}",
             *[f"--train_flag={flag}" for flag in QUICK_TRAINING]]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env=with_cheap_compile())
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "bench_compare.json") as f:
    report = json.load(f)
  [round_one] = report["rounds"]
  assert set(round_one) == {"ours (JAX)", "ours (JAX, bf16)", "Keras/TF"}
  for name, measured in round_one.items():
    assert measured["steady_epoch_s"] > 0 and measured["peak_rss_mb"] > 100, name
  # Ours trained on 1,280 examples; the reference on 6,000 (0.826 measured): both learn.
  assert 0.7 < round_one["Keras/TF"]["test_accuracy"] <= 1
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
