"""The ImageNet recipes on 16 devices, on JPEGs of varying sizes generated in a TFDS format.

They are also these recipes' runs on JPEG data: configs/imagenet_resnet50.py as written
streams it, the Inception crop taken from the original image by decoding processes;
its `:imagenette` variant decodes and resizes it once into memory and measures the
normalization on it. How the recipes are shrunk, and the other recipes, are in
test_device_counts.py and test_device_counts_cifar10.py.
"""

import json
import os

import pytest

from test_datasets import TinyJpegImages
from test_device_counts import EVAL_EXAMPLES, check_group, train_on_16_devices


class ManyJpegImages(TinyJpegImages):
  """JPEGs of varying sizes with a validation split, standing in for imagenet2012 and
  imagenette (read back by name with TFDS's read-only builder, unregistered)."""

  TRAIN_EXAMPLES, EVAL_EXAMPLES, MAX_SIDE = 130, EVAL_EXAMPLES, 40


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
  """Prepared by TFDS once for this file."""
  data_dir = str(tmp_path_factory.mktemp("jpeg"))
  ManyJpegImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
  return tmp_path_factory.mktemp("16_devices")


@pytest.fixture(scope="module")
def imagenet_on_16_devices(jpeg_dir, trained_root):
  """Both ImageNet recipes, trained in one process (workdirs: TRAINED_ROOT/MODULE-ARG)."""
  return train_on_16_devices(["imagenet_stream", "imagenet_memory"], {"jpeg": jpeg_dir},
                             trained_root)


@pytest.mark.slow
def test_imagenet_recipe_streams_jpeg_data_on_16_devices(imagenet_on_16_devices, trained_root):
  """Stream, random-resized crops, flips, ImageNet normalization, label smoothing, warmup,
  Nesterov, bfloat16 lax convolutions: as written, but for the size."""
  from configs import imagenet_resnet50

  config = imagenet_resnet50.get_config()
  assert config.dataset.input == "stream"
  assert config.dataset.workers == -1  # one decoding process per core
  check_group("imagenet_stream", imagenet_on_16_devices["imagenet_stream"])
  # The checkpoint holds the stream's position.
  with open(os.path.join(trained_root, "imagenet_resnet50-None", "checkpoints", "2", "meta",
                         "metadata")) as f:
    assert json.load(f)["input"]["next_step"] == 2


@pytest.mark.slow
def test_imagenette_recipe_trains_from_memory_on_16_devices(imagenet_on_16_devices):
  """The JPEGs decoded and resized once, the Inception crop taken on the device, the
  normalization measured on the train split (the stand-in has no published one)."""
  from configs import imagenet_resnet50

  assert imagenet_resnet50.get_config("imagenette").dataset.input == "memory"
  check_group("imagenet_memory", imagenet_on_16_devices["imagenet_memory"])
