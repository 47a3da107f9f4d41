"""What `python -m research.main` runs once its flags are read, every setting an argument:
`run` sets the process up (joins the other processes, checks the backend and the workdir,
points the compilation cache), then `train_or_evaluate` trains or evaluates. main.py
parses the flags, sets up logging and turns a UserError into its message and exit status.
Tests call `train_or_evaluate` in their own process for runs whose subject is not the
command line (tests/conftest.py `run_here`).
"""

import contextlib
import errno
import os

from absl import logging

from research.errors import TrainingFailure, UserError

# Faults of the machine rather than of the code: a message, not a traceback.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def run(workdir: str, config, *, mode: str = "train", allow_config_change: bool = False,
        allow_cpu: bool = False, coordinator_address: str | None = None,
        num_processes: int | None = None, process_id: int | None = None) -> None:
  """Sets this process up (once: it joins the other processes, checks the backend and the
  workdir, points the compilation cache), then `train_or_evaluate`. Raises UserError for
  what the user can fix."""
  if not workdir:
    raise UserError("--workdir is required, e.g. --workdir=runs/default")
  if config.get("deterministic"):
    # Read by XLA when the GPU backend starts, hence before JAX is imported. Autotuning off
    # too: it times kernels and may pick another (deterministic) one in each process that
    # compiles. On an H200 (2026-12-04), two runs with the first flag alone ended with
    # different params; with both, equal ones.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops"
                               "=true --xla_gpu_autotune_level=0").strip()
  import jax

  from research import backend
  from research.run import compile_cache, distributed

  with _disk_errors_reported():
    how = distributed.initialize(coordinator_address, num_processes,
                                 process_id)  # before anything touches a device
    backend.check_accelerator_used(jax.default_backend(), allow_cpu)
    distributed.check_shared_workdir(workdir)  # all processes see one workdir, or exit 2
    compile_cache.set_up(config.get("compile_cache", compile_cache.AUTO))  # before compiles
  logging.info("JAX process %d of %d (%s), devices: %s", jax.process_index(),
               jax.process_count(), how, jax.devices())
  train_or_evaluate(workdir, config, mode, allow_config_change)


def train_or_evaluate(workdir: str, config, mode: str = "train",
                      allow_config_change: bool = False) -> None:
  """Mode "train": trains `config` into `workdir`, resuming what is there; mode "eval":
  evaluates a checkpoint of `workdir` with its stored config (`config.eval` chooses which
  and on what). A full or read-only disk is a TrainingFailure that says to rerun."""
  from research.config import config_validation
  from research.run import train

  with _disk_errors_reported():
    if mode == "eval":
      train.evaluate_checkpoint(_stored_config(workdir, config), workdir)
    else:
      # Mistakes the config alone shows fail here, before the run takes the workdir's lock.
      checked = config_validation.validate(config)
      train.train_and_evaluate(checked, workdir, allow_config_change)


@contextlib.contextmanager
def _disk_errors_reported():
  try:
    yield
  except OSError as e:
    if e.errno not in _DISK_ERRORS:
      raise
    raise TrainingFailure(
        f"Writing {e.filename or 'a file'} failed: {e.strerror}. Free some space (or fix the "
        "permissions) and rerun the same command: it resumes from the last checkpoint.") from e


def _stored_config(workdir: str, command_config):
  """The config a workdir was trained with; only `eval.*` comes from the command line.
  A damaged config.json is rebuilt (not rewritten) from the newest readable checkpoint."""
  from research.config import workdir_config
  from research.run import workdir_layout

  workdir_layout.check(workdir, writing=False)
  stored = workdir_config.stored(workdir, repair=False)
  if stored is None:
    raise UserError(f"--mode=eval needs {os.path.join(workdir, 'config.json')} (written by "
                    "training): is --workdir the workdir of a training run?")
  stored = workdir_config.read_stored(stored)  # fields newer code added take their defaults
  stored.eval = command_config.eval
  return stored
