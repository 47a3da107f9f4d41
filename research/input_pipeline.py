"""Streaming input: batches read, decoded and resized on the host while the devices train.

`config.dataset.input="stream"` is for datasets that do not fit in memory
(imagenet2012 is ~190 GB of pixels at 224 px). The host holds a few batches,
never a split. `train.py` asks `TrainStream.batches(step, stop)` for the chunk
of steps it is about to run and hands each piece to the compiled
`steps.train_on_batches`; evaluation iterates `EvalStream`. The in-memory path
(`data.py`, the default) is untouched; both share the decoding
(`data.read_examples`, `data.resize_and_centre_crop`), the order of examples and
the on-device augmentation (`augment.py`, from uint8 batches).

Order. The batch of global step s holds the examples
`data.batch_indices(seed, s, 1, batch_size, n)`: the very indices the in-memory
path gathers on the devices, so both paths train on identical batches, and a
step's batch depends on (seed, step) alone.

Pipeline. grain over the TFDS array_record data source (`builder.as_data_source`).
One element is this process's rows of one step's batch:
`grain.MapDataset.range(total_steps).map(read step s)`. It is index-addressable,
so there is no shuffle buffer and no state but the step. `to_iter_dataset` with
`grain.ReadOptions` reads, decodes (PNG/JPEG, TFDS's decoder) and resizes
several steps at a time in a thread pool and keeps a buffer of steps ahead of
training, so input overlaps the compiled steps (PIL releases the GIL while it
decodes and resizes).

Many hosts. Each process reads only the rows of each global batch that belong to
its own devices (`mesh.process_rows`); the global [steps, batch, ...] array is
assembled with `jax.make_array_from_process_local_data` (`mesh.from_process_rows`).

Compiled calls. A chunk of steps (up to the next log, eval or checkpoint, as in
memory mode) runs as pieces of at most `steps_per_call` steps, so one call's
batches stay under `CALL_BYTES`; the piece length divides `log_every_steps`, so
regular chunks split evenly and only a few shapes are compiled. Pieces start at
the chunk's first step and chunks at steps fixed by the schedule, so a resumed
run groups its steps exactly as an uninterrupted one.

Resume. The pipeline's position is a step: the grain iterator's `next_index` over
range(total_steps) is the number of steps trained. Every checkpoint's `meta`
records it (`checkpoint_meta()`: the next step and what fixes the order: dataset,
split, example count, batch size, seed). On restore the iterator is set to the
restored TrainState's step (`set_state`) and `check_resumed` requires the recorded
position to be that step, and warns when the order's inputs changed. grain's own
Orbax `CheckpointHandler` (as an extra checkpoint item) was not used: it writes
one file per process (`process_i-of-N.json`) and cannot restore with another
process count, while our checkpoints restore on any number of hosts; and it would
store only the number the TrainState holds already.

Evaluation. `EvalStream` reads a split in order, in batches of
`eval_batch_size` (rounded up to a multiple of the device count), the last one
padded with zeros and masked: every example counts exactly once. Again each
process reads only its rows.
"""

import dataclasses
import math
import os
import time
from typing import Any

import grain
import numpy as np
from absl import logging

from research import data, mesh as mesh_lib, prepare_data
from research.errors import TrainingFailure

INPUTS = ("memory", "stream")  # config.dataset.input
CALL_BYTES = 512 * 2**20  # at most this much global batch data per compiled call
MAX_THREADS = 32


def streams(dataset_config) -> bool:
  """Whether `config.dataset` asks for the streaming path (configs written before it
  existed have no `input` field: memory)."""
  return dataset_config.get("input", "memory") == "stream"


def requested_threads(dataset_config) -> int:
  """`config.dataset.reader_threads` (0, the default, where a config predates the field)."""
  return dataset_config.get("reader_threads", 0)


@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """One split of a prepared TFDS dataset, opened for random access; nothing is read
  until `read` is called."""

  builder: Any
  split: str
  source: Any  # tfds ArrayRecordDataSource
  image_size: int  # > 0: resize (shorter side, centre crop)
  image_shape: tuple[int, int, int]  # of the images `read` returns

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices) -> data.Split:
    """The examples at `indices`, decoded (and resized), in that order."""
    return data.read_examples(self.builder, self.split, self.source, [int(i) for i in indices],
                              self.image_size)


def open_dataset(dataset_config) -> tuple[data.DatasetInfo, StreamSplit, StreamSplit]:
  """(info, train split, eval split) opened for streaming, preparing the dataset if needed."""
  builder = prepare_data.ensure_prepared(dataset_config.name, dataset_config.data_dir or None)
  info, image_size = data.dataset_info(builder, dataset_config)
  return (info, _open(builder, dataset_config.train_split, image_size, info),
          _open(builder, dataset_config.eval_split, image_size, info))


def open_split(dataset_config, split: str) -> tuple[data.DatasetInfo, StreamSplit]:
  """(info, one split opened for streaming), e.g. to evaluate a checkpoint on `split`."""
  builder = prepare_data.ensure_prepared(dataset_config.name, dataset_config.data_dir or None)
  info, image_size = data.dataset_info(builder, dataset_config)
  return info, _open(builder, split, image_size, info)


def _open(builder, split: str, image_size: int, info: data.DatasetInfo) -> StreamSplit:
  return StreamSplit(builder, split, data.open_split(builder, split), image_size, info.image_shape)


def steps_per_call(batch_bytes: int, log_every: int) -> int:
  """The most steps whose batches fit in CALL_BYTES, among the divisors of `log_every`."""
  fits = max(1, CALL_BYTES // max(1, batch_bytes))
  return max(d for d in range(1, min(fits, log_every) + 1) if log_every % d == 0)


def reader_threads(requested: int = 0) -> int:
  """`requested` threads, or 0: one per CPU core this process may use, at most MAX_THREADS."""
  return requested or min(MAX_THREADS, len(os.sched_getaffinity(0)))


def _reader(dataset, pieces: int, threads: int):
  """An iterator over `dataset` (a grain MapDataset) read ahead by `reader_threads(threads)`
  threads: at least `pieces` elements, and one per thread, in flight."""
  threads = reader_threads(threads)
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, pieces))
  return iter(dataset.to_iter_dataset(options))


class TrainStream:
  """The training batches of steps [start_step, total_steps), as global arrays."""

  def __init__(self, split: StreamSplit, mesh, *, seed: int, batch_size: int, total_steps: int,
               start_step: int, log_every: int, threads: int = 0):
    self.split = split
    self.mesh = mesh
    self.seed = seed
    self.batch_size = batch_size
    batch_bytes = batch_size * math.prod(split.image_shape)
    self.steps_per_call = steps_per_call(batch_bytes, log_every)
    self._rows = mesh_lib.process_rows(batch_size, mesh, batch_axis=1)
    steps = grain.MapDataset.range(total_steps).map(self._read_step)
    self._iterator = _reader(steps, 2 * self.steps_per_call, threads)
    self._iterator.set_state({"next_index": start_step})
    self._iterator.start_prefetch()  # the first batches are read while the step compiles

  def _read_step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the batch of `step` (runs in a reader thread)."""
    indices = data.batch_indices(self.seed, step, 1, self.batch_size, len(self.split))[0]
    local = self.split.read(indices[self._rows])
    return local.images, local.labels

  @property
  def position(self) -> int:
    """The next step whose batch this stream will hand out."""
    return int(self._iterator.get_state()["next_index"])

  def batches(self, step: int, stop: int):
    """Yields (images [k, batch, H, W, C], labels [k, batch], input seconds) for steps
    [step, stop), k <= steps_per_call; the seconds are the wait for this piece."""
    if step != self.position:
      raise RuntimeError(f"The input stream is at step {self.position}, training at step {step}.")
    for first in range(step, stop, self.steps_per_call):
      started = time.perf_counter()
      count = min(self.steps_per_call, stop - first)
      local = [next(self._iterator) for _ in range(count)]
      images = np.stack([images for images, _ in local])
      labels = np.stack([labels for _, labels in local])
      yield (mesh_lib.from_process_rows(images, (count, self.batch_size, *images.shape[2:]),
                                        self.mesh, batch_axis=1),
             mesh_lib.from_process_rows(labels, (count, self.batch_size), self.mesh, batch_axis=1),
             time.perf_counter() - started)

  def _order(self) -> dict:
    return {"dataset": self.split.builder.info.full_name, "split": self.split.split,
            "num_examples": len(self.split), "batch_size": self.batch_size, "seed": self.seed}

  def checkpoint_meta(self) -> dict:
    """What a checkpoint records of this stream: the next step and what fixes the order."""
    return {"input": {"next_step": self.position, **self._order()}}

  def check_resumed(self, meta: dict | None, step: int) -> None:
    """Checks the position a restored checkpoint recorded against its TrainState's step."""
    recorded = (meta or {}).get("input")
    if recorded is None:  # written in memory mode: the same order, a function of (seed, step)
      return
    if recorded.get("next_step") != step:
      raise TrainingFailure(
          f"The checkpoint of step {step} recorded the input stream at step "
          f"{recorded.get('next_step')}: the checkpoint is inconsistent. Resume from another "
          "step (move this one out of WORKDIR/checkpoints) or use a fresh --workdir.")
    changed = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in self._order().items()
               if recorded.get(key) != value]
    if changed:
      logging.warning("The order of training examples changed since the checkpoint of step %d "
                      "(%s): training goes on, but not as the uninterrupted run would have.",
                      step, ", ".join(changed))

  def close(self) -> None:
    """Stops the reader threads and drops the batches read ahead."""
    self._iterator.close()


class EvalStream:
  """Calling it yields a split's padded batches in order, as global arrays
  (images [k, batch, H, W, C], labels [k, batch], mask [k, batch]), read ahead in
  threads; the last batch is padded with zeros of mask 0. `batch_size` is rounded up
  to a multiple of the device count (`mesh.rounded_to_devices`), so that every batch
  splits evenly over the devices."""

  def __init__(self, split: StreamSplit, mesh, batch_size: int, threads: int = 0):
    self.split = split
    self.threads = threads
    self.mesh = mesh
    self.batch_size = batch_size = mesh_lib.rounded_to_devices(batch_size, mesh)
    self.num_batches = -(-len(split) // batch_size)
    batch_bytes = batch_size * math.prod(split.image_shape)
    self.batches_per_call = min(self.num_batches, max(1, CALL_BYTES // batch_bytes))
    self._rows = mesh_lib.process_rows(batch_size, mesh, batch_axis=1)

  def _read_batch(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    positions = batch * self.batch_size + self._rows
    valid = positions < len(self.split)
    images = np.zeros((len(positions), *self.split.image_shape), np.uint8)
    labels = np.zeros((len(positions),), np.int32)
    if valid.any():
      read = self.split.read(positions[valid])
      images[valid], labels[valid] = read.images, read.labels
    return images, labels, valid.astype(np.float32)

  def __call__(self):
    iterator = _reader(grain.MapDataset.range(self.num_batches).map(self._read_batch),
                       2 * self.batches_per_call, self.threads)
    try:
      for first in range(0, self.num_batches, self.batches_per_call):
        count = min(self.batches_per_call, self.num_batches - first)
        local = [next(iterator) for _ in range(count)]
        yield tuple(
            mesh_lib.from_process_rows(np.stack(arrays), (count, self.batch_size,
                                                          *arrays[0].shape[1:]),
                                       self.mesh, batch_axis=1)
            for arrays in zip(*local))
    finally:
      iterator.close()
