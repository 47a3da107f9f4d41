"""Datasets other than Fashion-MNIST, on small data generated here in their real TFDS formats.

CIFAR-10 is prepared by TFDS's own `cifar10` builder from generated files in the
original binary format (only the download is replaced by a local folder); a JPEG
dataset of varying image sizes stands in for imagenette / imagenet2012. Both are
then read back by `research.data.datasets` exactly as real data would be. The CIFAR-10
recipe trains on its data here; the ImageNet recipes train on JPEGs, streamed and from
memory, in test_device_counts_imagenet.py (and every recipe on 16 devices in the
test_device_counts*.py files).
"""

import io
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar

from conftest import run_here
from research.data import datasets
from research.errors import UserError

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


class _LocalFolder:
  """Stands in for TFDS's download manager: the archive is already extracted here."""

  def __init__(self, path):
    self.path = path

  def download_and_extract(self, url):
    del url
    return self.path


class Cifar10(cifar.Cifar10, skip_registration=True):
  """TFDS's cifar10 builder, reading the original files from a local folder."""

  source = ""

  def _split_generators(self, dl_manager):
    return super()._split_generators(_LocalFolder(self.source))


def _write_cifar10_binaries(folder, per_file=8, seed=0):
  """Files in the original CIFAR-10 binary layout: label byte + 3072 CHW pixel bytes."""
  rng = np.random.default_rng(seed)
  batches = os.path.join(folder, "cifar-10-batches-bin")
  os.makedirs(batches)
  with open(os.path.join(batches, "batches.meta.txt"), "w") as f:
    f.write("\n".join(LABEL_NAMES) + "\n")
  written = {}
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    labels = rng.integers(0, 10, per_file, dtype=np.uint8)
    images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
    records.tofile(os.path.join(batches, name))
    written[name] = (images.transpose(0, 2, 3, 1), labels)
  return written


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar10")
  written = _write_cifar10_binaries(str(root / "source"))
  Cifar10.source = str(root / "source")
  builder = Cifar10(data_dir=str(root / "tfds"), file_format="array_record")
  builder.download_and_prepare()
  return str(root / "tfds"), written


def _dataset_config(name, data_dir, **fields):
  return ml_collections.ConfigDict({"name": name, "data_dir": data_dir, "train_split": "train",
                                    "eval_split": "test", "image_size": 0, "normalize": False,
                                    **fields})


def test_cifar10_in_the_real_format_reads_back_exactly(cifar10_dir):
  data_dir, written = cifar10_dir
  info, train_split, test_split = datasets.load(_dataset_config("cifar10", data_dir))
  assert info.image_shape == (32, 32, 3) and info.num_classes == 10
  assert info.class_names == tuple(LABEL_NAMES)
  assert len(train_split) == 40 and len(test_split) == 8
  # The same (image, label) pairs as the generated binaries; TFDS stores them in
  # the order of its hashed example keys.
  def pairs(images, labels):
    return sorted((image.tobytes(), int(label)) for image, label in zip(images, labels))

  expected = [written[f"data_batch_{i}.bin"] for i in range(1, 6)]
  assert pairs(train_split.images, train_split.labels) == pairs(
      np.concatenate([e[0] for e in expected]), np.concatenate([e[1] for e in expected]))
  assert pairs(test_split.images, test_split.labels) == pairs(*written["test_batch.bin"])


def test_validation_hold_out_is_carved_from_train(cifar10_dir):
  data_dir, _ = cifar10_dir
  config = _dataset_config("cifar10", data_dir, train_split="train[:75%]",
                           eval_split="train[75%:]")
  _, train_part, held_out = datasets.load(config)
  _, whole, _ = datasets.load(_dataset_config("cifar10", data_dir))
  assert len(train_part) == 30 and len(held_out) == 10
  np.testing.assert_array_equal(np.concatenate([train_part.images, held_out.images]), whole.images)


def test_unknown_dataset_and_split_fail_with_what_is_accepted(cifar10_dir):
  data_dir, _ = cifar10_dir
  with pytest.raises(UserError, match="not a TFDS dataset"):
    datasets.load(_dataset_config("cifar_ten", data_dir))
  with pytest.raises(UserError, match="Accepted: a split name"):
    datasets.load(_dataset_config("cifar10", data_dir, eval_split="validation"))


def test_the_tfds_module_named_for_each_dataset_defines_its_builder():
  """prepare_data imports that one module so that tfds.builder need not import them all: a
  TFDS release that moves a builder elsewhere fails here (the run would only be slower)."""
  from research.data import prepare_data

  for name, module in prepare_data._TFDS_MODULES.items():
    assert tfds.builder_cls(name).__module__ == f"tensorflow_datasets.{module}", name


def test_normalization_constants_exist_for_the_supported_datasets():
  for name in ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "imagenet2012",
               "imagenette/320px-v2"):
    mean, std = datasets.normalization(name)
    assert mean.shape == std.shape and np.all(std > 0)
  with pytest.raises(UserError, match="No normalization constants"):
    datasets.normalization("emnist")
  split = datasets.Split(np.full((4, 2, 2, 3), 51, np.uint8), np.zeros(4, np.int32))
  mean, _ = datasets.normalization("emnist", split)  # measured when the data is at hand
  np.testing.assert_allclose(mean, 0.2, atol=1e-6)


@pytest.mark.slow
def test_cifar10_resnet_recipe_trains_on_cifar10_format_data(cifar10_dir, tmp_path,
                                                             cheap_compiles):
  data_dir, _ = cifar10_dir
  # Compiling dominates (ResNet-20's initialization alone takes 22 s with LLVM's costlier
  # passes, 2.5 s without): 55 CPU-s with them, 20 without.
  result = run_here(str(tmp_path / "run"), "--config=configs/cifar10_resnet.py:smoke",
                    f"--config.dataset.data_dir={data_dir}", "--config.model.width=4",
                    "--config.batch_size=8", "--config.eval_batch_size=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Final test accuracy" in result.stderr


class TinyJpegImages(tfds.core.GeneratorBasedBuilder):
  """JPEG images of varying sizes, like imagenette / imagenet2012."""

  VERSION = tfds.core.Version("1.0.0")
  TRAIN_EXAMPLES, EVAL_EXAMPLES, MAX_SIDE = 24, 6, 60

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["tench", "springer", "cassette"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(self.TRAIN_EXAMPLES, 0),
            "validation": self._generate_examples(self.EVAL_EXAMPLES, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for index in range(count):
      height, width = rng.integers(20, self.MAX_SIDE, 2)
      pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      encoded = io.BytesIO()
      Image.fromarray(pixels).save(encoded, format="JPEG")
      yield index, {"image": encoded.getvalue(), "label": int(rng.integers(0, 3))}


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("jpeg"))
  TinyJpegImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_jpeg_dataset_of_varying_sizes_is_decoded_and_resized(jpeg_dir):
  with pytest.raises(UserError, match="set --config.dataset.image_size"):
    datasets.load(_dataset_config("tiny_jpeg_images", jpeg_dir, eval_split="validation"))
  info, train_split, evaluation = datasets.load(
      _dataset_config("tiny_jpeg_images", jpeg_dir, eval_split="validation", image_size=16))
  assert info.image_shape == (16, 16, 3) and info.num_classes == 3
  assert train_split.images.shape == (24, 16, 16, 3) and evaluation.images.shape == (6, 16, 16, 3)
