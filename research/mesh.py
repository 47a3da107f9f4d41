"""The device mesh and how host arrays become global arrays on it.

One axis, "data", spans every device of every process. Batches are split along
it. Parameters and optimizer state are replicated by default; with
`config.shard_params` they are split along the same axis (FSDP-style: each
device holds a slice and XLA gathers a parameter where it is used). Each
process passes only its own rows of a global batch (`global_batch`), so the same
code serves 1 CPU, 8 GPUs or a pod.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """All devices of all processes on the "data" axis, in an order that suits the
  interconnect (a ring on TPU); Auto axes, so jit propagates shardings itself."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def split_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """Splits an array along its largest axis that divides by the size of the data
  axis; an array with no such axis (a scalar, a bias of odd length) stays whole."""
  size = mesh.shape[DATA_AXIS]
  candidates = [axis for axis in np.argsort(shape)[::-1] if shape[axis] % size == 0]
  if size == 1 or not candidates:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[int(candidates[0])] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_state, mesh: Mesh, shard_params: bool):
  """Shardings for a TrainState: everything replicated, or with `shard_params`
  the parameters and optimizer state split along the data axis."""
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract_state)
  if not shard_params:
    return shardings
  split = lambda leaf: split_sharding(leaf.shape, mesh)
  return shardings.replace(params=jax.tree.map(split, abstract_state.params),
                           opt_state=jax.tree.map(split, abstract_state.opt_state))


def rounded_to_devices(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the devices on the data axis: an
  evaluation batch of any size splits evenly once padded (the padding is masked)."""
  devices = mesh.shape[DATA_AXIS]
  return -(-batch_size // devices) * devices


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """The same full array on every device (each process holds all of it)."""
  return jax.make_array_from_process_local_data(replicated(mesh), array, array.shape)


def process_rows(global_size: int, mesh: Mesh, batch_axis: int = 0) -> np.ndarray:
  """Indices along the batch axis held by this process's devices, in order."""
  shape = [1] * (batch_axis + 1)
  shape[batch_axis] = global_size
  rows = set()
  for index in batch_sharding(mesh, batch_axis).addressable_devices_indices_map(
      tuple(shape)).values():
    rows.update(range(*index[batch_axis].indices(global_size)))
  return np.asarray(sorted(rows))


def global_batch(array: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
  """A global array split along `batch_axis`; `array` is the full global batch and
  this process contributes only the rows that belong to its own devices."""
  local = np.take(array, process_rows(array.shape[batch_axis], mesh, batch_axis), axis=batch_axis)
  return from_process_rows(local, array.shape, mesh, batch_axis)


def from_process_rows(local: np.ndarray, global_shape: tuple[int, ...], mesh: Mesh,
                      batch_axis: int = 0) -> jax.Array:
  """A global array of `global_shape` split along `batch_axis`, from this process's
  rows only (`process_rows`, in order): what a streaming input reads on each host."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axis), local,
                                                 tuple(global_shape))
