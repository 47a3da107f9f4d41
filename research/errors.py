"""User-facing errors: a mistake the user can fix, reported without a traceback."""

import os
import sys


class UserError(Exception):
  """Something the user asked for cannot be done; the message says how to fix it.

  `main` prints the message and exits with status 2 (1 for runtime failures such
  as a non-finite loss, see `TrainingFailure`).
  """

  exit_code = 2

  def exit(self):
    """Ends a command-line program: the message on stderr, the exit status, no traceback."""
    print(f"error: {self}", file=sys.stderr, flush=True)
    # Work this error abandoned (Orbax's background writes after a failed checkpoint) can
    # still log from other threads and at interpreter shutdown; the message stays last.
    # Only the process's own stderr: an in-process caller (a test's capture) keeps its own.
    if sys.stderr is sys.__stderr__:
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stderr__.fileno())
    sys.exit(self.exit_code)


class TrainingFailure(UserError):
  """Training started but had to stop (non-finite loss, disk full, ...)."""

  exit_code = 1
