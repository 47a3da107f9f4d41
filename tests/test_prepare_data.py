"""`python -m research.prepare_data` (what `make data` runs) end to end: Fashion-MNIST
prepared offline from Debian's original files into an empty TFDS folder, the same
examples as the suite's copy, and a second run that finds it prepared and changes nothing."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO, tree_digest
from research.data import datasets, prepare_data


def _prepare(data_dir, *flags):
  command = [sys.executable, "-m", "research.prepare_data", "--dataset=fashion_mnist",
             f"--data_dir={data_dir}", *flags]
  # Offline: the files must come from Debian's package, never from a download.
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                        env={**os.environ, prepare_data.OFFLINE_ENV: "1"})


@pytest.mark.slow
def test_prepare_data_prepares_fashion_mnist_offline_then_finds_it_prepared(fashion_mnist,
                                                                             tmp_path):
  source = prepare_data.LOCAL_SOURCES["fashion_mnist"]
  if not os.path.isdir(source.directory):
    pytest.skip(f"{source.directory} is missing: `make data` installs {source.debian_package}")
  data_dir = tmp_path / "tfds"
  first = _prepare(data_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  version_dir = data_dir / "fashion_mnist" / "3.0.1"
  assert f"fashion_mnist is prepared in {version_dir}" in first.stdout, first.stdout
  assert f"Preparing fashion_mnist from {source.directory}" in first.stderr

  config = ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": str(data_dir),
                                      "train_split": "train", "eval_split": "test"})
  info, train, test = datasets.load(config)
  _, suite_train, suite_test = fashion_mnist
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1)
  for mine, suites in [(train, suite_train), (test, suite_test)]:
    np.testing.assert_array_equal(mine.images, suites.images)
    np.testing.assert_array_equal(mine.labels, suites.labels)

  before = tree_digest(data_dir)
  again = _prepare(data_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"fashion_mnist is prepared in {version_dir}" in again.stdout
  assert "Preparing" not in again.stderr  # found as it was: nothing prepared again
  assert tree_digest(data_dir) == before
