"""User-facing errors: a mistake the user can fix, reported without a traceback."""

import os
import sys
import threading

# How long a program that is ending may take to shut down (the interpreter waits for
# library threads; Orbax's can wait forever after a failed write) before it is ended.
SHUTDOWN_SECONDS = 5.0


def end_within(status: int, seconds: float = SHUTDOWN_SECONDS) -> None:
  """Makes sure the process ends, with `status`, at most `seconds` from now.

  Python waits at exit for every non-daemon thread; a library thread blocked on a
  signal that never comes (Orbax's, after a checkpoint folder vanished mid-write) would
  hang the program after its error was reported. A daemon timer ends it instead. Only
  for programs that are ending (entry points), never in a library or a test process.
  """
  timer = threading.Timer(seconds, lambda: os._exit(status))
  timer.daemon = True
  timer.start()


class UserError(Exception):
  """Something the user asked for cannot be done; the message says how to fix it.

  `main` prints the message and exits with status 2 (1 for runtime failures such
  as a non-finite loss, see `TrainingFailure`).
  """

  exit_code = 2

  def exit(self):
    """Ends a command-line program: the message on stderr, the exit status, no traceback."""
    message = f"error: {self}\n"
    if sys.stderr is not sys.__stderr__:  # an in-process caller (a test's capture)
      print(message, end="", file=sys.stderr, flush=True)
      sys.exit(self.exit_code)
    # Work this error abandoned (Orbax's background writes after a failed checkpoint) can
    # still write from other threads and at interpreter shutdown: the process's stderr goes
    # to /dev/null first, then the message is written to the stream it was, so it is last.
    sys.stderr.flush()
    stream = sys.__stderr__.fileno()
    original = os.dup(stream)
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream)
    with open(original, "w", encoding=sys.__stderr__.encoding or "utf-8",
              errors="backslashreplace") as out:
      out.write(message)
    end_within(self.exit_code)
    sys.exit(self.exit_code)


class TrainingFailure(UserError):
  """Training started but had to stop (non-finite loss, disk full, ...)."""

  exit_code = 1


def require(condition: bool, field: str, value, accepted: str) -> None:
  """The one form of refusing a config value: the flag, the value given, what is accepted."""
  if not condition:
    raise UserError(f"--config.{field}={value!r} is not accepted: {accepted}.")
