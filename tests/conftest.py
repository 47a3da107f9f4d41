"""Shared fixtures: the real Fashion-MNIST (prepared offline by TFDS) and helpers."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fashion_mnist():
  """(info, train, test) of the real dataset, prepared from Debian's files if needed."""
  import ml_collections

  from research import data

  config = ml_collections.ConfigDict(
      {"name": "fashion_mnist", "data_dir": "", "train_split": "train", "eval_split": "test"})
  return data.load(config)


def run_main(workdir, *flags, timeout=600, env=None):
  """Runs `python -m research.main` as a user would; returns the CompletedProcess."""
  command = [sys.executable, "-m", "research.main", f"--workdir={workdir}", *flags]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """One short real run (300 steps, ~0.8 test accuracy, steps 100-150 profiled)
  shared by the report, prediction and run.json tests."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  result = run_main(workdir, "--config=configs/default.py:smoke", "--config.profile_steps=100,50")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def tree_digest(directory) -> dict:
  """{relative path: sha256} of every file under `directory`: equal digests mean untouched."""
  import hashlib

  digest = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digest
