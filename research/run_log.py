"""Where a run's numbers go: metrics.jsonl, TensorBoard and the console.

Only process 0 writes. On resume, metrics.jsonl is cut back to the restored
step first, so the file reads exactly as if the run had never stopped.
"""

import json
import math
import os
import time

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"


class RunLog:

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._writer = None
    self._file = None
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # lazy: 0.3 s import

    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def _truncate_after(self, step: int) -> None:
    """Drops lines newer than `step`: they will be written again, identically."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, split: str, step: int, epoch: float, elapsed: float, **values) -> None:
    """One event: a line in metrics.jsonl and scalars in TensorBoard."""
    if not self.enabled:
      return
    record = {"step": step, "epoch": round(epoch, 4), "split": split,
              **{k: _plain(v) for k, v in values.items()}, "elapsed": round(elapsed, 3)}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key not in ("step", "split", "epoch", "elapsed") and isinstance(value, (int, float)):
        self._writer.add_scalar(f"{split}/{key}", value, step)

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._writer:
      self._writer.close()


def _step_of(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return -1  # keep malformed lines out of the way of the comparison: drop nothing else


def _plain(value):
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float):
    return value if math.isfinite(value) else str(value)
  return value


class Progress:
  """Throughput and ETA between log lines (wall clock, so input waits count too)."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    seconds = max(now - self._last_time, 1e-9)
    steps_per_sec = (step - self._last_step) / seconds
    self._last_step, self._last_time = step, now
    remaining = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    return {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self.batch_size,
            "eta_sec": remaining}


  def restart_clock(self) -> None:
    """Leaves evaluation and checkpoint time out of the training speed."""
    self._last_time = time.perf_counter()


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def console(message: str, *args) -> None:
  if jax.process_index() == 0:
    logging.info(message, *args)
