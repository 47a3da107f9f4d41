"""The device mesh and how host arrays become global arrays on it.

One axis, "data", spans every device of every process. Batches are split along
it; parameters are replicated. Each process passes only its own part of a
global batch (`global_batch`), so the same code serves 1 CPU, 8 GPUs or a pod.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """The same full array on every device (each process holds all of it)."""
  return jax.make_array_from_process_local_data(replicated(mesh), array, array.shape)


def global_batch(array: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
  """A global array split along `batch_axis`; `array` is the full global batch and
  this process contributes only the rows that belong to its own devices."""
  sharding = batch_sharding(mesh, batch_axis)
  size = array.shape[batch_axis]
  per_process = size // jax.process_count()
  start = jax.process_index() * per_process
  local = np.take(array, np.arange(start, start + per_process), axis=batch_axis)
  return jax.make_array_from_process_local_data(sharding, local, array.shape)
