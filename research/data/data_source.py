"""The data source: a dataset in the form `config.dataset.input` asks for, chosen once.

`from_config(dataset_config, eval_split=..., train=...)` is the one loader of every job
(training, evaluating a checkpoint, reports, predictions, benchmarks). It returns a
`MemorySource` (research/data/datasets.py: splits decoded once, held on the devices) or a
`StreamSource` (research/data/stream_input.py: batches decoded by worker processes while
the devices train); both offer the same things and nothing above this module asks
which it holds:

  info                 the dataset's name, image shape and classes
  num_train, num_eval  example counts
  input_functions      (train_input, eval_input): uint8 batch -> model input on the
                       device, with the augmentations and normalization
  train_feed           the training loop's batches: `chunk(state, step, stop)`
  eval_batches         a callable yielding padded, masked eval batches (global arrays)
  eval_examples        the eval split as host arrays, in chunks (reports)

The two forms see the same example order (`datasets.batch_indices`). Where they differ
is the crops: in memory, images are stored at `image_size` (shorter side, centre
crop) and the Inception crop is taken on the device; streamed, the crops come from
the original image in the workers (research/data/image_crops.py) and the device only
flips and normalizes.
"""

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from research import mesh as mesh_lib
from research.data import augment, datasets, prepare_data
from research.errors import UserError

INPUTS = ("memory", "stream")  # config.dataset.input


def from_config(dataset_config, eval_split: str | None = None, train: bool = True):
  """The dataset of `dataset_config` in its input form: the train split (unless
  `train=False`) and `eval_split` (default: dataset_config.eval_split), prepared if
  needed. Memory mode reads them now; stream mode only opens them."""
  eval_split = eval_split or dataset_config.eval_split
  if dataset_config.get("input", "memory") == "stream":  # configs older than `input`: memory
    return StreamSource(dataset_config, eval_split, train)
  return MemorySource(dataset_config, eval_split, train)


@dataclasses.dataclass(frozen=True)
class Feed:
  """Where the training loop's batches come from."""

  chunk: Callable  # (state, step, stop) -> (state, per-step metrics on the host, input seconds)
  checkpoint_meta: Callable[[], dict] = dict  # added to each checkpoint's meta
  close: Callable[[], None] = lambda: None  # stops input workers, if any
  check_resumed: Callable = lambda meta, step: None  # a restored checkpoint's input position


def _first_rows(metrics, count: int) -> dict:
  """The metrics of the steps run: a compiled loop returns a row for each step it could run."""
  return {name: values[:count] for name, values in jax.device_get(metrics).items()}


def _joined(pieces: list) -> dict:
  """Per-step metrics of consecutive compiled calls, fetched once, after the last call."""
  return jax.tree.map(lambda *values: np.concatenate(values), *jax.device_get(pieces))


def memory_feed(train_many, split: datasets.Split, mesh, *, seed: int, batch_size: int, rows: int,
                where) -> Feed:
  """`split` on the devices; each compiled call of `train_many` gathers its batches by index.

  On CPU every call passes `rows` rows of indices (the unused ones zero) and how many
  to run, so one compiled loop serves chunks of any length. On accelerators the loop's
  trip count must be static (a traced one syncs with the host every step): a chunk
  runs as calls of power-of-two lengths (`Backend.piece_lengths`), each compiled once,
  dispatched back to back; metrics are fetched after the last."""
  images = mesh_lib.put_replicated(split.images, mesh)
  labels = mesh_lib.put_replicated(split.labels, mesh)

  def chunk(state, step, stop):
    started = time.perf_counter()  # input time: host work before the compiled calls
    indices = datasets.batch_indices(seed, step, stop - step, batch_size, len(split))
    if not where.static_trip_counts:
      indices = np.pad(indices, ((0, rows - len(indices)), (0, 0)))
      batch_indices = mesh_lib.global_batch(indices, mesh, batch_axis=1)
      input_seconds = time.perf_counter() - started
      state, metrics = train_many(state, images, labels, batch_indices, stop - step)
      return state, _first_rows(metrics, stop - step), input_seconds
    pieces, input_seconds, offset = [], time.perf_counter() - started, 0
    for length in where.piece_lengths(stop - step):
      started = time.perf_counter()
      batch_indices = mesh_lib.global_batch(indices[offset:offset + length], mesh, batch_axis=1)
      input_seconds += time.perf_counter() - started
      state, piece_metrics = train_many(state, images, labels, batch_indices)  # static length
      pieces.append(piece_metrics)
      offset += length
    return state, _joined(pieces), input_seconds

  return Feed(chunk)


class MemorySource:
  """Whole splits in memory; the compiled steps gather their batches on the devices."""

  def __init__(self, dataset_config, eval_split: str, train: bool):
    self.config = dataset_config
    if train:
      self.info, self.train, self.eval = datasets.load(_with_eval_split(dataset_config, eval_split))
    else:
      self.info, self.eval = datasets.load_split(dataset_config, eval_split)
      self.train = None
    self.num_train = len(self.train) if self.train is not None else 0
    self.num_eval = len(self.eval)

  def input_functions(self, augment_config):
    """(train_input(images, key), eval_input(images)) on the device. Statistics a dataset
    has no constants for are measured on the train split (read here if not held)."""
    mean, std = normalization(self.config, self.info, self.train)
    return augment.make_train_input(augment_config, mean, std), augment.make_eval_input(mean, std)

  def train_feed(self, loops, mesh, *, seed: int, batch_size: int, plan, start_step: int,
                 where, augment_config=None) -> Feed:
    """The dataset on the devices; each compiled call gathers its batches by index
    (`loops`: the run's train loops, run.train.TrainLoops)."""
    del start_step, augment_config  # the order is a function of (seed, step); crops on device
    return memory_feed(loops.on_indices(), self.train, mesh, seed=seed,
                       batch_size=batch_size, rows=plan.max_chunk, where=where)

  def eval_batches(self, mesh, batch_size: int):
    """A callable yielding the eval split's padded batches (images, labels, mask) as
    global arrays [num_batches, batch, ...], all at once. The batch is rounded up to a
    multiple of the device count; the extra rows are masked padding."""
    batch_size = mesh_lib.rounded_to_devices(batch_size, mesh)
    arrays = [mesh_lib.global_batch(a, mesh, batch_axis=1)
              for a in datasets.padded_for_eval(self.eval, batch_size)]
    return lambda: [arrays]

  def eval_examples(self, chunk: int = 1000):
    """Yields the eval split as (uint8 images, labels): here, whole."""
    del chunk
    yield self.eval.images, self.eval.labels


class StreamSource:
  """Splits opened for streaming; batches decoded by input workers while training."""

  def __init__(self, dataset_config, eval_split: str, train: bool):
    from research.data import stream_input  # grain's import (~0.5 s): streamed datasets only

    self.config = dataset_config
    builder = prepare_data.ensure_prepared(dataset_config.name, dataset_config.data_dir or None)
    self.info, _ = datasets.dataset_info(builder, dataset_config)
    self._order_name = builder.info.full_name
    self.train = (stream_input.open_split(builder, dataset_config, dataset_config.train_split,
                                          self.info.image_shape) if train else None)
    self.eval = stream_input.open_split(builder, dataset_config, eval_split, self.info.image_shape)
    self.num_train = len(self.train) if train else 0
    self.num_eval = len(self.eval)
    self.workers = int(dataset_config.get("workers", 0))
    self.threads = int(dataset_config.get("reader_threads", 0))

  def _crops_on_host(self, augment_config) -> bool:
    """The Inception crop is taken from the original image in the workers."""
    return bool(augment_config.get("random_resized_crop", False)) and self.train.resize

  def input_functions(self, augment_config):
    """(train_input(images, key), eval_input(images)) on the device: the flip, padding
    crop and normalization; the Inception crop was taken in the workers."""
    mean, std = normalization(self.config, self.info)
    on_device = augment_config
    if self.train is not None and self._crops_on_host(augment_config):
      on_device = augment_config.copy_and_resolve_references()
      on_device.random_resized_crop = False
    return augment.make_train_input(on_device, mean, std), augment.make_eval_input(mean, std)

  def train_feed(self, loops, mesh, *, seed: int, batch_size: int, plan, start_step: int,
                 where, augment_config=None) -> Feed:
    """Batches read ahead by the workers; one compiled call per piece of a chunk (pieces
    divide log_every, so few lengths are compiled)."""
    from research.data import stream_input

    del where  # the pieces' lengths are fixed by the byte budget, on every backend
    train_on_batches = loops.on_batches()
    crop = "inception" if self._crops_on_host(augment_config or {}) else "centre"
    stream = stream_input.TrainStream(
        self.train, mesh, seed=seed, batch_size=batch_size, total_steps=plan.total_steps,
        start_step=start_step, log_every=plan.log_every, crop=crop, workers=self.workers,
        threads=self.threads, order_name=self._order_name, split_name=self.config.train_split)

    def chunk(state, step, stop):
      pieces, input_seconds = [], 0.0
      for images, labels, seconds in stream.batches(step, stop):
        state, piece_metrics = train_on_batches(state, images, labels)
        pieces.append(piece_metrics)  # fetched after the last piece: no wait in between
        input_seconds += seconds
      return state, _joined(pieces), input_seconds

    return Feed(chunk, stream.checkpoint_meta, stream.close, stream.check_resumed)

  def eval_batches(self, mesh, batch_size: int):
    """A callable yielding the eval split's padded batches in pieces read by the workers."""
    from research.data import stream_input

    return stream_input.EvalStream(self.eval, mesh, batch_size, workers=self.workers,
                                   threads=self.threads)

  def eval_examples(self, chunk: int = 1000):
    """Yields the eval split as (uint8 images, labels), `chunk` examples at a time (a
    streamed dataset is never read whole)."""
    for start in range(0, self.num_eval, chunk):
      yield self.eval.read(range(start, min(start + chunk, self.num_eval)), "centre")


def normalization(dataset_config, info: datasets.DatasetInfo, train: datasets.Split | None = None):
  """(mean, std) per channel, or (None, None) without `normalize`: the dataset's constants;
  for a dataset without constants, measured on `train` (read here in memory mode; a
  streamed dataset is never read whole, so it is refused)."""
  if not dataset_config.get("normalize", False):
    return None, None
  if info.name.split("/")[0] in datasets.NORMALIZATION:
    return datasets.normalization(info.name)
  if dataset_config.get("input", "memory") == "stream":
    raise UserError(f"No normalization constants for dataset {info.name!r} (known: "
                    f"{', '.join(datasets.NORMALIZATION)}), and a streamed dataset is not read "
                    "whole to measure them: set --config.dataset.normalize=False, or "
                    "--config.dataset.input=memory if it fits in memory.")
  if train is None:
    train = datasets.load_split(dataset_config, dataset_config.train_split)[1]
  return datasets.normalization(info.name, train)


def eval_input(dataset_config, info: datasets.DatasetInfo):
  """images -> model input as evaluation makes it, from the config alone (predictions)."""
  return augment.make_eval_input(*normalization(dataset_config, info))


def _with_eval_split(dataset_config, eval_split: str):
  if eval_split == dataset_config.eval_split:
    return dataset_config
  config = dataset_config.copy_and_resolve_references()
  config.eval_split = eval_split
  return config


def info(dataset_config) -> datasets.DatasetInfo:
  """The dataset's metadata alone (shape, classes): nothing decoded."""
  builder = prepare_data.ensure_prepared(dataset_config.name, dataset_config.data_dir or None)
  return datasets.dataset_info(builder, dataset_config)[0]
