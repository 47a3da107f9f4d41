"""Datasets: their metadata, the order of training examples, and the in-memory form.

What every input form shares lives here: `DatasetInfo` (name, image shape,
classes), the split opener (`open_split`, TFDS's array_record data source), the
epoch order (`batch_indices`: which examples each step sees, a function of
(seed, step) alone, so a resumed run sees exactly the batches an uninterrupted
one would), and the normalization constants.

The in-memory form (`load`, `load_split`): small image datasets (MNIST,
Fashion-MNIST, CIFAR) fit in memory many times over, so a split is read once
from TFDS into uint8 arrays (cached beside the data) and put on the devices; the
compiled train step gathers each batch from there by index. `load` refuses,
before decoding anything, a dataset that would not fit (memory_fit.py). The
streamed form is research/data/stream_input.py; the training loop sees either only
through research/data/data_source.py.
"""

import dataclasses
import functools
import os
import re

import numpy as np
from absl import logging

from research.data import prepare_data
from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]

  def __len__(self):
    return len(self.labels)


def load(dataset_config) -> tuple[DatasetInfo, Split, Split]:
  """Returns (info, train split, eval split), preparing the dataset if needed."""
  from research.data import memory_fit  # imports JAX; input workers import this module without

  builder = prepare_data.ensure_prepared(dataset_config.name, dataset_config.data_dir or None)
  info, image_size = dataset_info(builder, dataset_config)
  # Before anything is decoded: the train split goes whole to every device, the eval
  # split is divided among them.
  memory_fit.check(builder, dataset_config, info.image_shape,
                   replicated=[dataset_config.train_split], divided=[dataset_config.eval_split])
  train = read_split(builder, dataset_config.train_split, image_size)
  evaluation = read_split(builder, dataset_config.eval_split, image_size)
  return info, train, evaluation


def load_split(dataset_config, split: str) -> tuple[DatasetInfo, Split]:
  """Returns (info, one split), e.g. for evaluating a checkpoint on `split`."""
  from research.data import memory_fit

  builder = prepare_data.ensure_prepared(dataset_config.name, dataset_config.data_dir or None)
  info, image_size = dataset_info(builder, dataset_config)
  memory_fit.check(builder, dataset_config, info.image_shape, divided=[split])
  return info, read_split(builder, split, image_size)


def dataset_info(builder, dataset_config) -> tuple[DatasetInfo, int]:
  """The dataset's metadata and the image size to resize to (0: keep the stored size)."""
  features = builder.info.features
  image_size = int(dataset_config.get("image_size", 0))
  shape = tuple(features["image"].shape)
  if image_size:
    shape = (image_size, image_size, shape[-1])
  elif None in shape:
    raise UserError(f"Images of {dataset_config.name} vary in size: set --config.dataset.image_size "
                    "(e.g. 224 or 64) to resize them (shorter side, then a centre crop).")
  info = DatasetInfo(
      name=dataset_config.name,
      image_shape=shape,
      num_classes=features["label"].num_classes,
      class_names=tuple(features["label"].names),
  )
  return info, image_size


def read_split(builder, split: str, image_size: int = 0) -> Split:
  """Reads a whole split into memory, through a decoded-array cache beside the data.

  `image_size` > 0 resizes every image (shorter side to `image_size`, centre
  crop), for datasets of JPEGs of varying sizes such as imagenette.
  """
  name = re.sub(r"[^\w.%-]", "_", split) + (f"_{image_size}px" if image_size else "")
  cache = os.path.join(os.fspath(builder.data_path) + ".decoded", name + ".npz")
  if os.path.exists(cache):
    try:
      with np.load(cache) as arrays:
        cached = Split(arrays["images"], arrays["labels"])
      if not (cached.images.dtype == np.uint8 and cached.images.ndim == 4
              and cached.labels.ndim == 1 and len(cached.images) == len(cached.labels) > 0):
        raise ValueError("arrays of unexpected shape or type")
      return cached
    except Exception as e:  # a damaged cache fails in zipfile, numpy or pickle: just decode
      logging.warning("Ignoring unreadable cache %s (%s: %s); decoding again.", cache,
                      type(e).__name__, e)
  split_data = _decode_split(builder, split, image_size)
  _write_atomically(cache, split_data)
  return split_data


def resize_and_centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to `size` (bilinear), then the centre `size` x `size` square."""
  from PIL import Image

  height, width = image.shape[:2]
  scale = size / min(height, width)
  resized_h, resized_w = max(size, round(height * scale)), max(size, round(width * scale))
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  resized = np.asarray(pil.resize((resized_w, resized_h), Image.BILINEAR)).reshape(
      resized_h, resized_w, image.shape[-1])
  top, left = (resized_h - size) // 2, (resized_w - size) // 2
  return resized[top:top + size, left:left + size]


def open_split(builder, split: str, decoders=None):
  """The TFDS data source of `split`: random access by example index, nothing read yet
  (`decoders`: TFDS's, e.g. to leave the images encoded)."""
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except ValueError as e:  # tfds reports unknown splits as ValueError
    raise UserError(f"Split {split!r} of {builder.name}: {e}. Accepted: a split name "
                    f"({', '.join(builder.info.splits)}) or a slice such as 'train[:90%]'.") from e
  except Exception as e:  # damaged files surface as many exception types
    raise _damaged(builder, split, e) from e


def read_examples(builder, split: str, source, indices, image_size: int = 0) -> Split:
  """Reads and decodes the examples at `indices` of `source` (a split opened by
  `open_split`), resized when `image_size` > 0; the in-memory and the streaming
  input paths both read through here."""
  try:
    examples = source.__getitems__(indices)
  except Exception as e:  # damaged files surface as many exception types
    raise _damaged(builder, split, e) from e
  images = [np.asarray(example["image"], np.uint8) for example in examples]
  if image_size:
    images = [resize_and_centre_crop(image, image_size) for image in images]
  labels = np.asarray([example["label"] for example in examples], dtype=np.int32)
  return Split(np.stack(images), labels)


def _decode_split(builder, split: str, image_size: int = 0) -> Split:
  source = open_split(builder, split)
  return read_examples(builder, split, source, range(len(source)), image_size)


def _damaged(builder, split: str, error: Exception) -> UserError:
  return UserError(f"{damaged_message(builder, split)} ({type(error).__name__}: {error})")


def damaged_message(builder, split: str) -> str:
  """What to tell the user when the files of `split` cannot be read."""
  return (f"Cannot read split {split!r} of {builder.name} from {builder.data_path} (files "
          f"{_split_files(builder, split)}). The prepared data looks damaged: delete that "
          "folder and run `make data` to prepare it again.")


def _split_files(builder, split: str) -> str:
  """The file names holding `split`, for messages about damaged data."""
  try:
    return ", ".join(os.path.basename(os.fspath(path))
                     for path in builder.info.splits[split].filepaths)
  except Exception:  # the split metadata itself may be what is damaged
    return "unknown"


def _write_atomically(path: str, split: Split) -> None:
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, images=split.images, labels=split.labels)
    os.replace(tmp, path)
  except OSError as e:  # a read-only data dir only costs the decode next time
    logging.warning("Could not write the decoded cache %s: %s", path, e)


# Per-channel mean and std of the training pixels in [0, 1], as commonly published.
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalization(name: str, train: Split | None = None):
  """(mean, std) per channel for `name`; measured on `train` for other datasets."""
  base = name.split("/")[0]
  if base in NORMALIZATION:
    return tuple(np.asarray(v, np.float32) for v in NORMALIZATION[base])
  if train is None:
    raise UserError(f"No normalization constants for dataset {name!r} (known: "
                    f"{', '.join(NORMALIZATION)}); set --config.dataset.normalize=False.")
  pixels = train.images.reshape(-1, train.images.shape[-1]).astype(np.float64) / 255.0
  return pixels.mean(0).astype(np.float32), np.maximum(pixels.std(0), 1e-3).astype(np.float32)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The shuffled order of the training examples in `epoch`, fixed by (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def batch_indices(seed: int, first_step: int, num_steps: int, batch_size: int,
                  num_examples: int) -> np.ndarray:
  """Example indices [num_steps, batch_size] for steps first_step.. (remainder dropped)."""
  steps_per_epoch = num_examples // batch_size
  rows = []
  for step in range(first_step, first_step + num_steps):
    epoch, position = divmod(step, steps_per_epoch)
    order = epoch_order(seed, epoch, num_examples)
    rows.append(order[position * batch_size:(position + 1) * batch_size])
  return np.stack(rows)


def padded_for_eval(split: Split, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads a split to whole batches: (images, labels, mask); padded rows have mask 0.

  Every example is evaluated exactly once; nothing is dropped.
  """
  count = len(split)
  padded = -(-count // batch_size) * batch_size
  pad = padded - count
  images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
  labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
  mask = np.concatenate([np.ones((count,), np.float32), np.zeros((pad,), np.float32)])
  shape = (padded // batch_size, batch_size)
  return (images.reshape(*shape, *images.shape[1:]), labels.reshape(shape), mask.reshape(shape))
