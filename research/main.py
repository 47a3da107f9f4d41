"""Command line entry point: `python -m research.main --config=configs/default.py --workdir=DIR`.

Every config field can be overridden with `--config.FIELD=VALUE`; a config file
can take an argument: `--config=configs/default.py:smoke`. The work happens in
`research.program` (set-up, then `research.run.train`); this file parses flags, sets
up logging and turns user mistakes into a message and exit status 2 (no traceback;
`--verbose` shows it).
"""

import logging as std_logging
import sys

from absl import app, flags, logging

from research import program
from research.config import command_line
from research.errors import UserError, end_within

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


def main(argv):
  _set_up_logging(_VERBOSE.value)
  try:
    if len(argv) > 1:
      raise UserError(f"Unexpected arguments: {' '.join(argv[1:])}. Every setting is a flag: "
                      "--workdir=DIR, --config=FILE, --config.FIELD=VALUE.")
    program.run(_WORKDIR.value, flags.FLAGS.config, mode=_MODE.value,
                allow_config_change=_ALLOW_CONFIG_CHANGE.value, allow_cpu=_ALLOW_CPU.value,
                coordinator_address=_COORDINATOR_ADDRESS.value,
                num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except UserError as e:
    _exit_with_message(e, _VERBOSE.value)
  except BaseException as e:  # a bug's traceback, preemption's exit status: still end promptly
    end_within(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
