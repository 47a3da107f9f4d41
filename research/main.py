"""Command line entry point: `python -m research.main --config=configs/default.py --workdir=DIR`.

Every config field can be overridden with `--config.FIELD=VALUE`; a config file
can take an argument: `--config=configs/default.py:smoke`. The work happens in
`research.train`; this file parses flags, reports the set-up and turns user
mistakes into a message and exit status 2 (no traceback; `--verbose` shows it).
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a workdir whose stored config differs from this one.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for user errors.")


class _QuietLibraries:
  """Keeps INFO lines from this package only; libraries (Orbax logs every file it
  renames) still show warnings and errors."""

  def filter(self, record) -> bool:
    # record.levelno is a standard logging level; absl's logging.WARNING is -1.
    return record.levelno >= std_logging.WARNING or "/research/" in record.pathname


def main(argv):
  if not _VERBOSE.value:
    logging.get_absl_handler().addFilter(_QuietLibraries())  # records of every logger pass here
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/default")
  import jax

  from research import train
  from research.errors import UserError

  logging.info("JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except UserError as e:
    if _VERBOSE.value:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  app.run(main)
