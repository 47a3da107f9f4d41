"""The streamed form of a dataset: batches decoded on the host while the devices train.

`config.dataset.input="stream"` is for datasets that do not fit in memory
(imagenet2012 is ~190 GB of pixels at 224 px). The host holds a few batches,
never a split. The training loop sees it only through research/data/data_source.py:
`TrainStream.batches(step, stop)` hands the chunk of steps it is about to run to
the compiled `steps.train_on_batches`; evaluation iterates `EvalStream`.

Workers. Decoding runs in `config.dataset.workers` processes (grain's
`mp_prefetch`; -1: one per core this process may use), or, with workers=0, in
threads of the trainer process (grain's `ReadOptions`, `reader_threads`; the old
form, cheap to start, for small data and tests). One grain element is this
process's rows of one step's batch: a worker reads and decodes its examples one
by one (research/data/stream_examples.py, research/data/image_crops.py) into a batch in
shared memory, which grain hands over by name; the trainer's main thread only
takes finished batches and gives them to the devices, with no copy on the host
(on the CPU backend none at all: the devices alias the shared memory;
research/data/host_buffers.py). Worker w computes steps
w, w+n, ...; grain interleaves them back in order, so the batches do not depend
on the worker count. A worker that dies (killed, out of memory) is reported as
a TrainingFailure within seconds; the checkpoints are untouched and the same
command resumes. The reader watches the workers' exit codes itself, outside grain's
locks: a worker SIGKILLed while it held one of them (grain's stop Event) would leave
grain's own report of it, and its close(), waiting forever.

Order. The batch of global step s holds `datasets.batch_indices(seed, s, 1, batch, n)`:
the indices the in-memory path gathers on the devices. Crops are drawn per
example from (seed, step, row) (stream_examples.py), so a step's batch depends
on (seed, step) alone.

Many hosts. Each process reads only the rows of each global batch that belong to
its own devices (`mesh.process_rows`); the global [steps, batch, ...] array is
assembled with `jax.make_array_from_process_local_data` (`mesh.from_process_rows`).

Compiled calls. A chunk of steps (up to the next log, eval or checkpoint, as in
memory mode) runs as pieces of at most `steps_per_call` steps, so one call's
batches stay under `CALL_BYTES`; the piece length divides `log_every_steps`, so
regular chunks split evenly and only a few shapes are compiled. Pieces start at
the chunk's first step and chunks at steps fixed by the schedule, so a resumed
run groups its steps exactly as an uninterrupted one.

Resume. The stream's position is a step: it starts at the restored TrainState's
step (grain's dataset is `range(start_step, total_steps)`) and counts the
batches handed out. Every checkpoint's `meta` records it (`checkpoint_meta()`:
the next step and what fixes the order: dataset, split, example count, batch
size, seed); on restore `check_resumed` requires the recorded position to be the
restored step, and warns when the order's inputs changed. grain's own Orbax
`CheckpointHandler` was not used: it writes one file per process and cannot
restore with another process count, while our checkpoints restore on any number
of hosts; and it would store only the number the TrainState holds already.

Evaluation. `EvalStream` reads a split in order, in batches of `eval_batch_size`
(rounded up to a multiple of the device count), the last one padded with zeros
and masked: every example counts exactly once.
"""

import atexit
import collections
import functools
import math
import multiprocessing
import os
import queue
import threading
import time

import grain
from absl import flags, logging

from research import mesh as mesh_lib
from research.data import datasets, host_buffers
from research.data.stream_examples import (MAX_THREADS, EvalBatch, ExampleReader, TrainStep,
                                           exit_with_trainer)
from research.errors import TrainingFailure, UserError

# At most this much global batch data per compiled call. Several steps in one call are
# stacked on the host, a copy of every batch on the trainer's main thread; from this size
# up a call takes one step and the batch goes from the worker's shared memory to the
# devices as it is (ImageNet at 224, batch 1024: 154 MB a step, one step a call).
CALL_BYTES = 128 * 2**20
WORKER_BUFFER = 2  # finished batches each worker may hold ahead
WATCH_SECONDS = 0.5  # while a batch is awaited, the workers' exit codes are read this often
# After a worker died, grain's close() may wait on a lock the dead worker held: it gets
# this long (in a daemon thread) once the other workers are killed.
ABANDON_SECONDS = 2


def open_split(builder, dataset_config, split: str, image_shape) -> ExampleReader:
  """`split` opened for streaming, the images left encoded: nothing is read yet."""
  import tensorflow_datasets as tfds

  area_range = (float(dataset_config.get("min_crop_area", 0.08)),
                float(dataset_config.get("max_crop_area", 1.0)))
  if area_range[0] > area_range[1]:
    raise UserError(f"--config.dataset.min_crop_area={area_range[0]} is above "
                    f"--config.dataset.max_crop_area={area_range[1]}: the Inception crop's "
                    "area range must run from the smaller to the larger (e.g. 0.08 and 1.0).")
  source = datasets.open_split(builder, split, decoders={"image": tfds.decode.SkipDecoding()})
  return ExampleReader(
      source=source, damaged_message=datasets.damaged_message(builder, split),
      image_shape=tuple(image_shape), resize=bool(dataset_config.get("image_size", 0)),
      crop_fraction=float(dataset_config.get("crop_fraction", 0.875)),
      area_range=area_range)


def steps_per_call(batch_bytes: int, log_every: int) -> int:
  """The most steps whose batches fit in CALL_BYTES, among the divisors of `log_every`."""
  fits = max(1, CALL_BYTES // max(1, batch_bytes))
  return max(d for d in range(1, min(fits, log_every) + 1) if log_every % d == 0)


def cores() -> int:
  """CPU cores this process may use."""
  return len(os.sched_getaffinity(0))


def worker_count(requested: int) -> int:
  """`config.dataset.workers`: -1 -> one per core; 0 -> threads in this process."""
  return cores() if requested < 0 else requested


def reader_threads(requested: int = 0) -> int:
  """`requested` threads, or 0: one per CPU core this process may use, at most MAX_THREADS."""
  return requested or min(MAX_THREADS, cores())


class _Reader:
  """Iterates a grain MapDataset of batches read ahead in worker processes (or, with
  workers=0, threads), turning a dead worker into a TrainingFailure.

  With workers, grain's iterator runs in a fetcher thread of this reader, one batch per
  request, while the caller waits in steps of WATCH_SECONDS and reads the workers' exit
  codes between them: a dead worker ends the wait even when grain's own report of it
  hangs (see the module's docstring)."""

  def __init__(self, dataset, ahead: int, workers: int, threads: int):
    self.workers = workers = worker_count(workers)
    if workers:
      # Runs before multiprocessing's own exit handler (registered earlier; atexit is LIFO).
      atexit.unregister(_finish_shared_memory_frees)
      atexit.register(_finish_shared_memory_frees)
      if not flags.FLAGS.is_parsed():  # grain reads its flags when it starts workers
        flags.FLAGS.mark_as_parsed()
      # In a worker the batches are computed one at a time: the parallelism is the workers.
      dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
          grain.MultiprocessingOptions(
              num_workers=workers,
              per_worker_buffer_size=max(WORKER_BUFFER, -(-ahead // workers))),
          worker_init_fn=functools.partial(exit_with_trainer, os.getpid()))
    else:
      threads = reader_threads(threads)
      dataset = dataset.to_iter_dataset(
          grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, ahead)))
    self._iterator = iter(dataset)
    # The processes this reader's workers may be: those started after this point.
    self._others = set(multiprocessing.active_children())
    self._workers = {}  # pid -> multiprocessing.Process, kept once seen alive
    self._requests, self._results = queue.Queue(), queue.Queue()
    self._fetcher = None

  def start(self) -> None:
    """Starts reading ahead now (the first batches are read while the step compiles)."""
    if hasattr(self._iterator, "start_prefetch"):
      self._iterator.start_prefetch()

  def __next__(self):
    if not self.workers:
      return next(self._iterator)
    if self._fetcher is None:
      self._fetcher = threading.Thread(target=self._fetch, name="stream-input-fetch",
                                       daemon=True)
      self._fetcher.start()
    self._requests.put(True)
    while True:
      self._raise_if_a_worker_died()
      try:
        batch, error = self._results.get(timeout=WATCH_SECONDS)
        break
      except queue.Empty:
        continue
    if error is not None:
      self._raise_if_a_worker_died()
      if isinstance(error, RuntimeError) and "terminated unexpectedly" in str(error):
        # grain saw a worker die before this reader did.
        raise _worker_died(str(error).splitlines()[0]) from None
      raise error
    _RECEIVED_BLOCKS.extend(leaf.shm.name for leaf in batch
                            if getattr(leaf, "shm", None) is not None)
    return batch

  def _fetch(self) -> None:
    """The fetcher thread: one batch from grain per request, until a False request."""
    while self._requests.get():
      try:
        self._results.put((next(self._iterator), None))
      except BaseException as e:  # handed to the caller's thread
        self._results.put((None, e))

  def _dead_worker(self):
    """A worker of this reader that exited with a non-zero code, or None."""
    for process in multiprocessing.active_children():  # also reaps those that ended
      if process not in self._others:
        self._workers.setdefault(process.pid, process)
    return next((p for p in self._workers.values() if p.exitcode not in (None, 0)), None)

  def _raise_if_a_worker_died(self) -> None:
    if (dead := self._dead_worker()) is not None:
      raise _worker_died(f"pid {dead.pid}, exit code {dead.exitcode}")

  def close(self) -> None:
    if self._fetcher is not None:
      self._requests.put(False)
    if not self.workers or self._dead_worker() is None:
      self._iterator.close()
      return
    # A dead worker may have held a lock grain's close() waits on: it never comes free.
    # The other workers are stopped here, and grain's close gets a bounded time.
    for worker in self._workers.values():
      if worker.exitcode is None:
        worker.kill()
    closer = threading.Thread(target=self._iterator.close, name="stream-input-close",
                              daemon=True)
    closer.start()
    closer.join(ABANDON_SECONDS)
    if closer.is_alive():
      logging.warning("The input pipeline did not stop within %d s of a worker's death; it "
                      "is abandoned (its memory is freed when this process ends).",
                      ABANDON_SECONDS)


def _worker_died(what: str) -> TrainingFailure:
  return TrainingFailure(
      f"An input worker process died ({what}). A killed worker is most often the host "
      "running out of memory: lower --config.dataset.workers or the batch size. The "
      "checkpoints are untouched; rerun the same command to resume.")


# The names of the newest shared-memory batches this process received: the only ones a
# live array may still hold at exit (older ones were freed as their steps ran). Without
# this, 2 of 5 runs of tests/test_stream_workers.py's resume ended with 1-2 blocks left
# to the resource tracker; none in 11 with it.
_RECEIVED_BLOCKS = collections.deque(maxlen=4096)


def _finish_shared_memory_frees() -> None:
  """At exit, before Python abandons grain's pool of background frees of shared-memory
  batches: the batches dropped so far are freed, and then the newest ones received,
  still held by arrays Python may never finalize; else the resource tracker frees them
  but warns of "leaked shared_memory objects". Registered once, with the first reader
  that starts worker processes."""
  import gc
  from multiprocessing import shared_memory

  from grain.multiprocessing import SharedMemoryArray

  gc.collect()  # batches dropped in reference cycles queue their frees in __del__
  frees = getattr(SharedMemoryArray, "_del_thread_pool", None)  # absent: frees are inline
  if frees is not None:
    frees.apply(int)  # one thread, in order: returns once every earlier free is done
  for name in _RECEIVED_BLOCKS:
    try:
      block = shared_memory.SharedMemory(name)
    except FileNotFoundError:
      continue  # freed
    block.close()
    block.unlink()  # the name only: a mapping still in use stays valid


class TrainStream:
  """The training batches of steps [start_step, total_steps), as global arrays."""

  def __init__(self, reader: ExampleReader, mesh, *, seed: int, batch_size: int, total_steps: int,
               start_step: int, log_every: int, crop: str = "none", workers: int = 0,
               threads: int = 0, order_name: str = "", split_name: str = ""):
    self.reader = reader
    self.mesh = mesh
    self.seed = seed
    self.batch_size = batch_size
    self._names = order_name, split_name
    batch_bytes = batch_size * math.prod(reader.image_shape)
    self.steps_per_call = steps_per_call(batch_bytes, log_every)
    rows = mesh_lib.process_rows(batch_size, mesh, batch_axis=1)
    steps = grain.MapDataset.range(start_step, total_steps).map(
        TrainStep(reader, crop, seed, batch_size, rows, shared=worker_count(workers) > 0))
    self._reader = _Reader(steps, 2 * self.steps_per_call, workers, threads)
    self._position = start_step
    self._reader.start()

  @property
  def position(self) -> int:
    """The next step whose batch this stream will hand out."""
    return self._position

  def batches(self, step: int, stop: int):
    """Yields (images [k, batch, H, W, C], labels [k, batch], input seconds) for steps
    [step, stop), k <= steps_per_call; the seconds are the wait for this piece."""
    if step != self.position:
      raise RuntimeError(f"The input stream is at step {self.position}, training at step {step}.")
    for first in range(step, stop, self.steps_per_call):
      started = time.perf_counter()
      count = min(self.steps_per_call, stop - first)
      local = [next(self._reader) for _ in range(count)]
      self._position += count
      images, labels = (host_buffers.stacked([arrays[i] for arrays in local]) for i in (0, 1))
      yield (mesh_lib.from_process_rows(images, (count, self.batch_size, *images.shape[2:]),
                                        self.mesh, batch_axis=1),
             mesh_lib.from_process_rows(labels, (count, self.batch_size), self.mesh, batch_axis=1),
             time.perf_counter() - started)

  def _order(self) -> dict:
    return {"dataset": self._names[0], "split": self._names[1],
            "num_examples": len(self.reader), "batch_size": self.batch_size, "seed": self.seed}

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
    """Stops the workers (or threads) and drops the batches read ahead."""
    self._reader.close()


class EvalStream:
  """Calling it yields a split's padded batches in order, as global arrays
  (images [k, batch, H, W, C], labels [k, batch], mask [k, batch]), read ahead by
  workers; the last batch is padded with zeros of mask 0. `batch_size` is rounded up
  to a multiple of the device count (`mesh.rounded_to_devices`), so that every batch
  splits evenly over the devices."""

  def __init__(self, reader: ExampleReader, mesh, batch_size: int, workers: int = 0,
               threads: int = 0):
    self.reader = reader
    self.workers, self.threads = workers, threads
    self.mesh = mesh
    self.batch_size = batch_size = mesh_lib.rounded_to_devices(batch_size, mesh)
    self.num_batches = -(-len(reader) // batch_size)
    batch_bytes = batch_size * math.prod(reader.image_shape)
    self.batches_per_call = min(self.num_batches, max(1, CALL_BYTES // batch_bytes))
    self._read_batch = EvalBatch(reader, batch_size,
                                 mesh_lib.process_rows(batch_size, mesh, batch_axis=1),
                                 shared=worker_count(workers) > 0)

  def __call__(self):
    reader = _Reader(grain.MapDataset.range(self.num_batches).map(self._read_batch),
                     2 * self.batches_per_call, self.workers, self.threads)
    try:
      for first in range(0, self.num_batches, self.batches_per_call):
        count = min(self.batches_per_call, self.num_batches - first)
        local = [next(reader) for _ in range(count)]
        yield tuple(
            mesh_lib.from_process_rows(host_buffers.stacked(arrays), (count, self.batch_size,
                                                          *arrays[0].shape[1:]),
                                       self.mesh, batch_axis=1)
            for arrays in zip(*local))
    finally:
      reader.close()
