"""A jax.profiler trace of chosen training steps: `--config.profile_steps=START,COUNT`.

The trace covers steps START+1 .. START+COUNT (the steps run after step START
is reached) and goes to WORKDIR/profile: TensorBoard's profile plugin reads it
(`tensorboard --logdir WORKDIR/profile`), and the `perfetto_trace.json.gz`
beside it opens in https://ui.perfetto.dev. The loop runs many steps per
compiled call, so `clip` makes a call end at START and at START+COUNT.
"""

import os

import jax
from absl import logging

from research.errors import UserError

PROFILE_DIR = "profile"


def parse(spec: str) -> tuple[int, int] | None:
  """"" -> None; "START,COUNT" -> (START, COUNT), else a UserError."""
  if not spec:
    return None
  parts = str(spec).split(",")
  try:
    start, count = (int(part) for part in parts)
  except ValueError:
    start = count = -1
  if len(parts) != 2 or start < 0 or count <= 0:
    raise UserError(f"--config.profile_steps={spec!r} is not accepted: two integers 'START,COUNT' "
                    "(START >= 0, COUNT > 0), e.g. --config.profile_steps=100,20; '' turns "
                    "profiling off.")
  return start, count


class TraceWindow:
  """Starts and stops the trace at chunk boundaries; a context manager so that a
  preempted or failing run still closes the trace it started."""

  def __init__(self, spec: str, workdir: str):
    self.window = parse(spec)
    self.directory = os.path.join(workdir, PROFILE_DIR)
    self.active = False

  def clip(self, step: int, stop: int) -> int:
    """`stop`, brought forward to the window's start or end when one lies in between."""
    if self.window is None:
      return stop
    start, count = self.window
    for boundary in (start, start + count):
      if step < boundary < stop:
        stop = boundary
    return stop

  def before_chunk(self, step: int) -> None:
    """Starts the trace when the chunk about to run lies in the window."""
    if self.window is None or self.active:
      return
    start, count = self.window
    if start <= step < start + count:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True
      logging.info("Profiling steps %d to %d into %s.", step + 1, start + count, self.directory)

  def after_chunk(self, step: int) -> None:
    """Stops the trace once the window's last step ran (before any evaluation)."""
    if self.active and step >= sum(self.window):
      self.stop()

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      logging.info("Profile written to %s (TensorBoard's profile plugin or ui.perfetto.dev).",
                   self.directory)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
    return False
