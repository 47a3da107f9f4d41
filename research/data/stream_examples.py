"""What one input worker computes: a step's training batch, or an evaluation batch.

These objects are pickled into grain's worker processes (research/data/stream_input.py),
so they import no JAX and hold only what the work needs: the split's TFDS data
source (undecoded: the image bytes), the order and the crop settings. Each example
is read and decoded on its own (research/data/image_crops.py) straight into its row of
the batch; in a worker process that batch is shared memory, which grain hands to
the trainer by name, with no copy (research/data/host_buffers.py).

Determinism: the batch of step s holds `datasets.batch_indices(seed, s)` (the in-memory
path's very order), and the crop of the example in global row r of step s is drawn
from `np.random.default_rng([seed, s, r])`. Nothing depends on which worker, how
many workers or which process computes it.
"""

import dataclasses
import os
import threading
import time
from typing import Any

import numpy as np

from research.data import datasets, host_buffers, image_crops
from research.errors import UserError

CROPS = ("inception", "centre", "none")  # training crop: random, the eval crop, or none
# Limits of config.dataset.reader_threads and .workers (here, not in stream_input: the
# config schema reads them without importing grain).
MAX_THREADS = 32
MAX_WORKERS = 256


@dataclasses.dataclass(frozen=True)
class ExampleReader:
  """One split's examples, decoded to the model's input shape."""

  source: Any  # tfds ArrayRecordDataSource with the image left encoded
  damaged_message: str  # what to tell the user when the files cannot be read
  image_shape: tuple[int, int, int]
  resize: bool  # image_size > 0: crop and resize; else decode whole
  crop_fraction: float
  area_range: tuple[float, float]

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices, crop: str = "centre", seeds=None,
           out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, H, W, C], int32 labels [n]) of the examples at `indices`;
    `seeds[i]` seeds example i's Inception crop (crop="inception"). The images are
    written into `out` (its first n rows) when given, and `out` is returned."""
    try:
      examples = self.source.__getitems__([int(i) for i in indices])
    except Exception as e:  # damaged files surface as many exception types
      raise UserError(f"{self.damaged_message} ({type(e).__name__}: {e})") from e
    images = np.empty((len(examples), *self.image_shape), np.uint8) if out is None else out
    for row, example in enumerate(examples):
      try:
        images[row] = self.decode(example["image"], crop,
                                  None if seeds is None else seeds[row])
      except image_crops.DamagedImage as e:  # a damaged record: as a file that cannot be read
        raise UserError(f"{self.damaged_message} (DamagedImage: example {int(indices[row])}: "
                        f"{e})") from e
    labels = np.asarray([example["label"] for example in examples], np.int32)
    return images, labels

  def decode(self, encoded: bytes, crop: str, seed=None) -> np.ndarray:
    size, channels = self.image_shape[0], self.image_shape[-1]
    if not self.resize or crop == "none":
      return image_crops.decode_whole(encoded, channels)
    height, width = image_crops.image_shape(encoded)  # the header only: the box decides the scale
    if crop == "inception":
      box = image_crops.inception_box(np.random.default_rng(seed), height, width,
                                      self.area_range, self.crop_fraction)
    else:
      box = image_crops.centre_box(height, width, self.crop_fraction, size)
    return image_crops.decode_box(encoded, box, size, channels, (height, width))


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """Step s -> this process's rows of the batch of step s (images, labels)."""

  reader: ExampleReader
  crop: str  # one of CROPS
  seed: int
  batch_size: int
  rows: np.ndarray  # the global rows of each batch this process reads
  shared: bool = False  # computed in a worker process: the batch goes out in shared memory

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    indices = datasets.batch_indices(self.seed, int(step), 1, self.batch_size, len(self.reader))[0]
    seeds = [(self.seed, int(step), int(row)) for row in self.rows]
    images = host_buffers.batch_buffer((len(self.rows), *self.reader.image_shape), np.uint8,
                                       self.shared)
    try:
      return self.reader.read(indices[self.rows], self.crop, seeds, out=images)
    except BaseException:
      host_buffers.release(images)
      raise


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """Batch b -> this process's rows of evaluation batch b (images, labels, mask); rows
  past the split's end are zeros with mask 0."""

  reader: ExampleReader
  batch_size: int
  rows: np.ndarray  # ascending: the valid rows come first
  shared: bool = False  # as in TrainStep

  def __call__(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    positions = int(batch) * self.batch_size + self.rows
    count = int(np.sum(positions < len(self.reader)))
    images = host_buffers.batch_buffer((len(positions), *self.reader.image_shape), np.uint8,
                                       self.shared)
    labels = np.zeros((len(positions),), np.int32)
    try:
      images[count:] = 0
      if count:
        labels[:count] = self.reader.read(positions[:count], "centre", out=images)[1]
    except BaseException:
      host_buffers.release(images)
      raise
    return images, labels, (np.arange(len(positions)) < count).astype(np.float32)


def exit_with_trainer(trainer_pid: int, worker_index: int, worker_count: int) -> None:
  """Runs first in each worker: ends the worker once the trainer is gone (a SIGKILLed
  trainer cannot stop its workers; orphans would hold memory and cores)."""
  del worker_index, worker_count

  def watch():
    while os.getppid() == trainer_pid:
      time.sleep(0.5)
    os._exit(1)

  threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()
