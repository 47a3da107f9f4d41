"""The CIFAR-10 recipes on 16 devices, and memory mode's refusals, on CIFAR-10-format data.

The data is generated in the original binary format and prepared by TFDS's own
builder (test_datasets.Cifar10), once for this file; how the recipes are shrunk, and
the Fashion-MNIST and ImageNet recipes, are in test_device_counts.py and
test_device_counts_imagenet.py.
"""

import os

import pytest

from conftest import run_main
from test_datasets import Cifar10
from test_device_counts import _devices_env, check_group, train_on_16_devices, write_cifar10


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  """550 train and 1000 test examples, prepared by TFDS once for this file."""
  root = tmp_path_factory.mktemp("generated")
  write_cifar10(str(root / "source"))
  Cifar10.source = str(root / "source")
  Cifar10(data_dir=str(root / "cifar10"), file_format="array_record").download_and_prepare()
  return str(root / "cifar10")


@pytest.fixture(scope="module")
def cifar10_on_16_devices(cifar10_dir, tmp_path_factory):
  return train_on_16_devices(["cifar10_resnet", "cifar10_vit"], {"cifar10": cifar10_dir},
                             tmp_path_factory.mktemp("16_devices"))


@pytest.mark.slow
def test_cifar10_resnet_recipes_train_and_evaluate_on_16_devices(cifar10_on_16_devices):
  check_group("cifar10_resnet", cifar10_on_16_devices["cifar10_resnet"])


@pytest.mark.slow
def test_cifar10_vit_recipes_train_and_evaluate_on_16_devices(cifar10_on_16_devices):
  check_group("cifar10_vit", cifar10_on_16_devices["cifar10_vit"])


@pytest.mark.parametrize("variable,where", [("RESEARCH_DEVICE_MEMORY_BYTES", "device memory"),
                                            ("RESEARCH_HOST_MEMORY_BYTES", "host memory")])
def test_memory_mode_refuses_a_dataset_larger_than_memory_before_decoding(
    variable, where, cifar10_dir, tmp_path):
  """CIFAR-10-format data (550 + 1000 examples of 3 kB: 4.8 MB) against 4 MB of device
  or host memory: refused with the sizes and the stream alternative, before any
  split is decoded (no decoded cache beside the data) and before the workdir is used."""
  workdir = tmp_path / "run"
  decoded = lambda: {path for path, _, _ in os.walk(cifar10_dir) if ".decoded" in path}
  decoded_before = decoded()  # other tests of this module may have decoded it already
  result = run_main(str(workdir), "--config=configs/cifar10_resnet.py:smoke",
                    f"--config.dataset.data_dir={cifar10_dir}",
                    env={**_devices_env(2), variable: str(4 * 10**6)})
  assert result.returncode == 2, result.stderr[-3000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith(f"error: cifar10 at 32x32x3 does not fit in {where}")
  assert "--config.dataset.input=stream" in message and "4.0 MB" in message
  assert "Traceback" not in result.stderr and not workdir.exists()
  assert decoded() == decoded_before
