import hashlib
import os

import numpy as np
import pytest

from research.data import datasets, prepare_data


def test_fashion_mnist_loads_whole_splits(fashion_mnist):
  info, train, test = fashion_mnist
  assert info.image_shape == (28, 28, 1) and info.num_classes == 10
  assert info.class_names[0] == "T-shirt/top"
  assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
  assert len(test) == 10000
  assert set(np.unique(train.labels)) == set(range(10))


def test_restored_gzip_headers_match_tfds_registered_checksums(tmp_path):
  source = prepare_data.LOCAL_SOURCES["fashion_mnist"]
  if not os.path.exists(source.directory):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  import tensorflow_datasets as tfds

  registered = {}
  path = os.path.join(os.path.dirname(tfds.__file__), "url_checksums", "fashion_mnist.txt")
  for line in open(path):
    url, size, sha256, name = line.split()
    registered[name] = sha256
  name = "t10k-labels-idx1-ubyte.gz"
  restored = tmp_path / name
  prepare_data.restore_original_gzip(os.path.join(source.directory, name), restored,
                                     source.gzip_mtimes[name])
  assert hashlib.sha256(restored.read_bytes()).hexdigest() == registered[name]


def test_epoch_order_is_fixed_by_seed_and_changes_each_epoch():
  first = datasets.batch_indices(seed=0, first_step=0, num_steps=10, batch_size=32, num_examples=1000)
  again = datasets.batch_indices(seed=0, first_step=0, num_steps=10, batch_size=32, num_examples=1000)
  other_seed = datasets.batch_indices(seed=1, first_step=0, num_steps=10, batch_size=32,
                                  num_examples=1000)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other_seed)
  # 1000 // 32 = 31 steps per epoch: step 31 starts epoch 1 with a new permutation.
  epoch0 = datasets.batch_indices(0, 0, 31, 32, 1000).ravel()
  epoch1 = datasets.batch_indices(0, 31, 31, 32, 1000).ravel()
  assert len(set(epoch0)) == len(epoch0) == 992  # no repeats within an epoch
  assert not np.array_equal(epoch0, epoch1)


def test_batch_indices_for_a_later_range_equal_the_same_rows_of_a_long_range():
  whole = datasets.batch_indices(3, 0, 100, 16, 500)
  np.testing.assert_array_equal(datasets.batch_indices(3, 57, 20, 16, 500), whole[57:77])


@pytest.mark.parametrize("batch_size", [1000, 768, 3])
def test_padded_eval_keeps_every_example_once(batch_size):
  labels = np.arange(10000, dtype=np.int32)
  split = datasets.Split(np.zeros((10000, 2, 2, 1), np.uint8), labels)
  images, padded_labels, mask = datasets.padded_for_eval(split, batch_size)
  assert images.shape[:2] == padded_labels.shape == mask.shape
  assert mask.shape[1] == batch_size and mask.sum() == 10000
  np.testing.assert_array_equal(padded_labels.ravel()[mask.ravel() == 1], labels)
