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
