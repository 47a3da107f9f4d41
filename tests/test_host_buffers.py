"""Host memory of finished input batches (research/data/host_buffers.py): batches reach the
devices without a host copy the pipeline could avoid, and with the right values.

On the CPU backend "without a copy" is visible: a device buffer that aliases the host
array starts at the host array's address. XLA's CPU client aliases only 64-byte-aligned
data; a plain numpy array of that size is not aligned, and is copied (the ~0.12 s per
ImageNet batch of 1024 that bounded the trainer's main thread, docs/input.md).
"""

import gc
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from grain.multiprocessing import SharedMemoryArray

from conftest import REPO
from research import mesh as mesh_lib
from research.data import datasets, host_buffers
from research.data.stream_examples import TrainStep

BATCH = (8, 16, 16, 3)


def _addresses(array: jax.Array) -> list[int]:
  return [shard.data.unsafe_buffer_pointer() for shard in array.addressable_shards]


@pytest.mark.parametrize("shape,dtype", [(BATCH, np.uint8), ((3, 5), np.float32), ((1,), np.int32)])
def test_aligned_arrays_start_at_a_page(shape, dtype):
  array = host_buffers.aligned_empty(shape, dtype)
  assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
  assert array.ctypes.data % host_buffers.PAGE == 0
  array[...] = 7  # writable, and all of it is ours
  assert (array == 7).all()


def test_an_aligned_batch_reaches_the_cpu_device_without_a_copy():
  mesh = mesh_lib.make_mesh()
  images = host_buffers.aligned_empty((1, *BATCH))
  images[...] = np.arange(images.size, dtype=np.uint64).reshape(images.shape) % 251
  on_devices = mesh_lib.from_process_rows(images, images.shape, mesh, batch_axis=1)
  if jax.default_backend() == "cpu":
    start = images.ctypes.data
    per_device = images.nbytes // len(jax.devices())
    assert _addresses(on_devices) == [start + i * per_device for i in range(len(jax.devices()))]
  np.testing.assert_array_equal(np.asarray(on_devices), images)
  # What the host side did before: numpy's own array, 16 bytes into a page, is copied.
  plain = np.zeros((1, 1024, 64, 64, 3), np.uint8)
  if jax.default_backend() == "cpu" and plain.ctypes.data % 64:
    copied = mesh_lib.from_process_rows(plain, plain.shape, mesh, batch_axis=1)
    assert _addresses(copied)[0] != plain.ctypes.data


def test_stacked_steps_are_a_view_of_one_step_or_an_aligned_copy_of_several():
  steps = [np.full(BATCH, step, np.uint8) for step in range(3)]
  one = host_buffers.stacked(steps[:1])
  assert one.shape == (1, *BATCH) and np.shares_memory(one, steps[0])
  several = host_buffers.stacked(steps)
  assert several.shape == (3, *BATCH) and several.ctypes.data % host_buffers.PAGE == 0
  np.testing.assert_array_equal(several, np.stack(steps))


class _Numbered:
  """A reader whose example i is an image full of i % 251 (its label: i)."""

  image_shape = BATCH[1:]

  def __len__(self):
    return 100

  def read(self, indices, crop, seeds, out):
    del crop, seeds
    out[:len(indices)] = (np.asarray(indices) % 251).astype(np.uint8)[:, None, None, None]
    return out, np.asarray(indices, np.int32)


def test_a_worker_writes_its_batch_into_shared_memory_that_grain_passes_by_name():
  """A SharedMemoryArray is what grain's workers hand over without copying it (grain
  copies any other array into a new block of shared memory first)."""
  step = TrainStep(_Numbered(), "none", seed=3, batch_size=8, rows=np.arange(8), shared=True)
  images, labels = step(5)
  try:
    assert isinstance(images, SharedMemoryArray) and images.ctypes.data % host_buffers.PAGE == 0
    np.testing.assert_array_equal(labels, datasets.batch_indices(3, 5, 1, 8, 100)[0])
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels % 251)
  finally:
    images.unlink_on_del()
  # In the trainer's own threads (workers=0): a page-aligned array.
  images, _ = TrainStep(_Numbered(), "none", seed=3, batch_size=8, rows=np.arange(8))(5)
  assert not isinstance(images, SharedMemoryArray) and images.ctypes.data % host_buffers.PAGE == 0


def test_a_failed_worker_batch_frees_its_shared_memory():
  class Broken(_Numbered):
    def read(self, indices, crop, seeds, out):
      self.buffer = out
      raise ValueError("damaged")

  reader = Broken()
  with pytest.raises(ValueError, match="damaged"):
    TrainStep(reader, "none", 0, 8, np.arange(8), shared=True)(0)
  path = os.path.join("/dev/shm", reader.buffer.shm.name.lstrip("/"))
  del reader.buffer
  gc.collect()  # the traceback's frames held the batch too
  deadline = time.monotonic() + 10  # grain may close shared memory in a thread
  while os.path.exists(path) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not os.path.exists(path)


@pytest.mark.slow
def test_several_devices_alias_their_rows_of_one_batch():
  """4 CPU devices: each aliases its own quarter of a step's batch (its rows start 64-byte
  aligned, as any 224 x 224 x 3 image does), with the right values."""
  script = textwrap.dedent("""
      import numpy as np
      from research import mesh as mesh_lib
      from research.data import host_buffers
      images = host_buffers.aligned_empty((1, 8, 8, 8, 3))  # 192 bytes a row
      images[...] = np.arange(images.size).reshape(images.shape) % 251
      on = mesh_lib.from_process_rows(images, images.shape, mesh_lib.make_mesh(), batch_axis=1)
      for shard in on.addressable_shards:
        rows = shard.index[1]
        np.testing.assert_array_equal(np.asarray(shard.data), images[:, rows])
        offset = shard.data.unsafe_buffer_pointer() - images.ctypes.data
        print(offset // images[0, 0].nbytes, rows.start)
      """)
  result = subprocess.run(
      [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split() for line in result.stdout.splitlines()]
  assert len(rows) == 4 and all(offset == start for offset, start in rows), rows
