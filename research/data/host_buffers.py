"""Host memory for finished input batches, laid out so that handing them to the devices
needs no copy the input pipeline could avoid (streamed datasets; research/data/stream_input.py).

Two facts shape this (measured on a Zen 3, docs/input.md, "The ceiling"):

- XLA's CPU client aliases a host array whose data is 64-byte aligned instead of
  copying it; numpy's own large arrays start 16 bytes into a page, so every
  `jax.device_put` of one copied it, into fresh device memory at about 1.3 GB/s
  (page faults of 4 KiB pages): 0.12 s for an ImageNet batch of 1024 at 224 px.
  With several devices each takes its rows of one step as a slice, aliased too when
  the slice starts 64-byte aligned (any whole number of 224 x 224 x 3 images does).
  On a GPU the transfer to the device is a real copy either way; alignment costs
  nothing there.
- grain hands a worker's numpy result to the trainer by copying it into a new
  shared-memory block; a result that already is a `grain.multiprocessing.SharedMemoryArray`
  goes by name, no copy. Shared memory is mapped at page boundaries, so the trainer's
  view of it is aligned too.

So a worker process writes each example straight into a shared-memory batch, a
thread (workers=0) into a page-aligned array, and several steps stacked for one
compiled call are stacked into a page-aligned array. Imports no JAX (workers load it).
"""

import math

import numpy as np

PAGE = 4096  # alignment of the arrays made here; XLA's CPU client needs 64


def aligned_empty(shape, dtype=np.uint8) -> np.ndarray:
  """An uninitialized array whose data starts at a page boundary."""
  dtype = np.dtype(dtype)
  size = math.prod(shape) * dtype.itemsize
  raw = np.empty(size + PAGE, np.uint8)
  start = -raw.ctypes.data % PAGE
  return raw[start:start + size].view(dtype).reshape(shape)


def batch_buffer(shape, dtype=np.uint8, shared: bool = False) -> np.ndarray:
  """Where a batch is written: with `shared` (in an input worker process) a block of
  shared memory that grain passes to the trainer by name; else a page-aligned array."""
  if not shared:
    return aligned_empty(shape, dtype)
  from grain.multiprocessing import SharedMemoryArray

  return SharedMemoryArray(tuple(shape), dtype)


def release(buffer: np.ndarray) -> None:
  """Frees a shared-memory `buffer` that will not be handed over (an error while it
  was filled); a plain array needs nothing."""
  if hasattr(buffer, "unlink_on_del"):
    buffer.unlink_on_del()


def stacked(arrays: list[np.ndarray]) -> np.ndarray:
  """[k, ...] from k arrays of one shape: one array is a view (no copy); several are
  stacked into a page-aligned array, the one copy a multi-step call needs."""
  if len(arrays) == 1:
    return arrays[0][None]
  out = aligned_empty((len(arrays), *arrays[0].shape), arrays[0].dtype)
  return np.stack(arrays, out=out)
