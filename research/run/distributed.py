"""Joining JAX's multi-controller runtime (`jax.distributed`) before any JAX use.

Every process runs the same program; `jax.distributed.initialize` connects them
through a coordinator so that `jax.devices()` lists the devices of all of them.
How a process learns its place, in order:

  1. explicit flags --coordinator_address, --num_processes, --process_id
     (launch/multiprocess.sh passes them; so can any launcher);
  2. a cluster JAX recognises: a SLURM job step with more than one task, or a
     Cloud TPU VM -> `jax.distributed.initialize()` with no arguments, which reads
     the scheduler's variables or the TPU metadata itself;
  3. otherwise one process on its own devices: nothing to initialize.

`any_process` is how processes agree on a host-side decision (stop for a
preemption) that only some of them may have seen. `check_shared_workdir` makes
sure, before anything is written, that all processes see one workdir: every
process writes a token there and looks for everyone's (a node-local --workdir
would otherwise leave process 0 training while the others wait forever).
"""

import glob
import importlib.util
import os
import socket

import jax
import numpy as np

from research.errors import UserError

# The variables JAX's own SLURM detection needs (jax._src.clusters.slurm_cluster):
# they are set inside `srun` job steps.
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")
_GOOGLE_PCI_VENDOR = "0x1ae0"


def detect_cluster(environ=os.environ) -> str | None:
  """The name of a cluster environment that JAX initializes itself, or None."""
  if all(name in environ for name in _SLURM_VARIABLES) and int(environ["SLURM_NTASKS"]) > 1:
    return "SLURM"
  if _on_cloud_tpu_vm():
    return "Cloud TPU VM"
  return None


def _on_cloud_tpu_vm() -> bool:
  """TPU chips on the PCI bus (Google's vendor id) and libtpu installed: what JAX's
  own Cloud TPU detection looks for. Google NICs share the vendor id, hence libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
  """Joins the distributed runtime if this is one process of several; says how."""
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = {flag: value for flag, value in explicit.items() if value is not None}
  if given:
    missing = [flag for flag in explicit if flag not in given]
    if missing:
      raise UserError(
          f"{', '.join(f'{k}={v}' for k, v in given.items())} given without "
          f"{', '.join(missing)}: a multi-process run needs all three (launch/multiprocess.sh "
          "passes them), or none of them for one process or a SLURM / Cloud TPU job, which "
          "JAX detects itself.")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise UserError(f"--coordinator_address={coordinator_address!r} is not accepted: "
                      "HOST:PORT of process 0, e.g. 127.0.0.1:12345 or node001:12345.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(f"--num_processes={num_processes} --process_id={process_id} is not "
                      "accepted: num_processes >= 1 and 0 <= process_id < num_processes.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return f"process {process_id} of {num_processes}, coordinator {coordinator_address}"
  cluster = detect_cluster()
  if cluster:
    jax.distributed.initialize()
    return f"{cluster}: process {jax.process_index()} of {jax.process_count()}"
  return "single process"


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any of them (a collective: all
  processes must call it at the same point)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


_TOKEN_PREFIX = ".shared-workdir-check-"
_HOSTNAME_BYTES = 64


def check_shared_workdir(workdir: str) -> None:
  """Stops every process of a multi-process run (UserError, exit 2) when they do not all
  see the same `workdir`, naming each process's host and what it saw. Each process writes
  a token file there (named by a nonce process 0 chooses) and reports which tokens it
  finds; the tokens are removed again, and so are the folders the check made: it leaves
  nothing behind. Collectives: every process calls it at the same point."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  count, me = jax.process_count(), jax.process_index()
  created, folder = [], os.path.abspath(workdir)  # the folders it makes, leaf first
  while not os.path.isdir(folder):
    created.append(folder)
    folder = os.path.dirname(folder)
  # A collective: every process has looked before any makes a folder.
  nonce = bytes(multihost_utils.broadcast_one_to_all(
      np.frombuffer(os.urandom(8), np.uint8))).hex()
  token = lambda index: os.path.join(workdir, f"{_TOKEN_PREFIX}{nonce}-{index}")
  os.makedirs(workdir, exist_ok=True)
  with open(token(me), "w") as f:
    f.write(socket.gethostname())
  multihost_utils.sync_global_devices("workdir tokens written")
  seen = np.array([os.path.exists(token(index)) for index in range(count)])
  host = np.frombuffer(socket.gethostname().encode()[:_HOSTNAME_BYTES].ljust(_HOSTNAME_BYTES),
                       np.uint8)
  path = np.frombuffer(os.path.abspath(workdir).encode()[:200].ljust(200), np.uint8)
  seen_by, hosts, paths = (np.asarray(a) for a in multihost_utils.process_allgather(
      (seen, host, path)))
  multihost_utils.sync_global_devices("workdir tokens read")
  os.remove(token(me))
  if seen_by.all():  # one folder: process 0 removes what the check made, before anyone writes
    multihost_utils.sync_global_devices("workdir tokens removed")
    if me == 0:
      _remove_empty(created)
    multihost_utils.sync_global_devices("workdir checked")
    return
  _remove_empty(created)
  text = lambda row: bytes(row).rstrip(b" ").decode(errors="replace")
  views = "; ".join(
      f"process {index} on {text(hosts[index])} ({text(paths[index])}) sees the token"
      f"{'s' if seen_by[index].sum() != 1 else ''} of process"
      f"{'es' if seen_by[index].sum() != 1 else ''} "
      f"{', '.join(str(i) for i in np.flatnonzero(seen_by[index])) or 'none'}"
      for index in range(count))
  raise UserError(
      f"--workdir={workdir} is not one folder shared by all {count} processes: {views}. A "
      "multi-process run needs a workdir on storage every host mounts at the same path (NFS, "
      "Filestore, gcsfuse), e.g. --workdir=/mnt/shared/runs/NAME; nothing was written.")


def _remove_empty(folders: list[str]) -> None:
  """Removes `folders` (leaf first) while they are empty: nothing left behind."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      return
