"""Command line entry point: `python -m research.main --config=configs/default.py --workdir=DIR`.

Every config field can be overridden with `--config.FIELD=VALUE`; a config file
can take an argument: `--config=configs/default.py:smoke`. The work happens in
`research.run.train`; this file parses flags, reports the set-up, validates the config
(research/config/config_validation.py) and turns user mistakes into a message and exit
status 2 (no traceback; `--verbose` shows it).
"""

import errno
import logging as std_logging
import os
import sys

from absl import app, flags, logging

from research.config import command_line
from research.errors import TrainingFailure, UserError, end_within

# --config (a config file, default configs/default.py) is defined by
# command_line.parse, which turns every flag mistake into a UserError.
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resumes automatically) or eval: evaluate a checkpoint of "
                          "--workdir, with the config stored there, on --config.eval.split.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a workdir whose stored config differs from this one.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for user errors.")
_ALLOW_CPU = flags.DEFINE_bool(
    "allow_cpu", False, "Train on the CPU although this machine has a GPU or TPU that JAX "
    "does not use (its accelerator wheels not installed: see docs/accelerators.md).")
# Multi-process runs (see research/run/distributed.py): all three, or none on one host,
# SLURM or a Cloud TPU VM.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 of a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")


class _QuietLibraries:
  """Keeps INFO lines from this package only; libraries (Orbax logs every file it
  renames) still show warnings and errors, as one line each: the tracebacks of
  their background threads (e.g. a failed checkpoint write) only with --verbose,
  since our own error message names the cause."""

  def filter(self, record) -> bool:
    ours = "/research/" in record.pathname
    if not ours:
      record.exc_info = record.exc_text = None
    # record.levelno is a standard logging level; absl's logging.WARNING is -1.
    return record.levelno >= std_logging.WARNING or ours


class _ConsoleFormat(std_logging.Formatter):
  """Console lines for people: a short time, then the message (warnings and errors say
  so); absl's prefix (level, date, thread id, file:line) stays in the --log_dir files
  and on the console with --verbose."""

  def __init__(self):
    super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

  def formatMessage(self, record) -> str:
    line = super().formatMessage(record)
    if record.levelno >= std_logging.WARNING:
      stamp, message = line.split(" ", 1)
      # Upper case: "error: " (lower case) starts the run's own last line, a UserError's.
      line = f"{stamp} {record.levelname}: {message}"
    return line


def _set_up_logging(verbose: bool) -> None:
  """absl's full lines go to the --log_dir files when that flag is given; the console
  gets short lines from this package (and libraries' warnings), or, with --verbose,
  absl's full lines from everything."""
  absl_handler = logging.get_absl_handler()
  to_files = bool(flags.FLAGS.log_dir) and not flags.FLAGS.logtostderr
  if to_files:
    absl_handler.use_absl_log_file()  # every INFO line, absl prefix and all
  if verbose and not to_files:
    return  # absl's own lines on stderr, as they always were
  console = std_logging.StreamHandler(sys.stderr) if to_files else absl_handler.python_handler
  console.setFormatter(logging.PythonFormatter() if verbose else _ConsoleFormat())
  if not verbose:
    console.addFilter(_QuietLibraries())
  if to_files:
    std_logging.getLogger().addHandler(console)


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


def _exit_with_message(error: UserError, verbose: bool):
  if verbose:
    end_within(error.exit_code)
    raise error
  error.exit()


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return command_line.parse(argv, flags.FLAGS)
  except UserError as e:  # flags are not parsed: look for --verbose by hand
    _exit_with_message(e, "--verbose" in argv)


# Faults of the machine rather than of the code: a message, not a traceback.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def main(argv):
  _set_up_logging(_VERBOSE.value)
  try:
    _run(argv)
  except UserError as e:
    _exit_with_message(e, _VERBOSE.value)
  except OSError as e:
    if e.errno not in _DISK_ERRORS:
      end_within(1)
      raise
    _exit_with_message(TrainingFailure(
        f"Writing {e.filename or 'a file'} failed: {e.strerror}. Free some space (or fix the "
        "permissions) and rerun the same command: it resumes from the last checkpoint."),
        _VERBOSE.value)
  except BaseException as e:  # a bug's traceback, preemption's exit status: still end promptly
    end_within(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
    raise


def _run(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"Unexpected arguments: {' '.join(argv[1:])}. Every setting is a flag: "
                    "--workdir=DIR, --config=FILE, --config.FIELD=VALUE.")
  if not _WORKDIR.value:
    raise UserError("--workdir is required, e.g. --workdir=runs/default")
  config = flags.FLAGS.config
  if config.get("deterministic"):
    # Read by XLA when the GPU backend starts, hence before JAX is imported.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_deterministic_ops=true").strip()
  import jax

  from research import backend
  from research.config import config_validation
  from research.run import compile_cache, distributed, train

  how = distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)  # before anything touches a device
  backend.check_accelerator_used(jax.default_backend(), _ALLOW_CPU.value)
  distributed.check_shared_workdir(_WORKDIR.value)  # all processes see one workdir, or exit 2
  compile_cache.set_up(config.get("compile_cache", compile_cache.AUTO))  # before any compile
  logging.info("JAX process %d of %d (%s), devices: %s", jax.process_index(),
               jax.process_count(), how, jax.devices())
  if _MODE.value == "eval":
    train.evaluate_checkpoint(_stored_config(_WORKDIR.value, config), _WORKDIR.value)
  else:
    # Mistakes the config alone shows fail here, before the run takes the workdir's lock.
    checked = config_validation.validate(config)
    train.train_and_evaluate(checked, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
