"""WORKDIR/run.json: what ran, on what, when, and how it ended.

Written by process 0 when training starts (status "running") and rewritten when
it stops: "finished", "preempted" (SIGTERM/SIGINT, resumable), "interrupted"
(a second Ctrl-C) or "failed" (with the error). A resumed run keeps the first
start time and adds a session, so the file tells the whole story of a workdir.
Final and best metrics are read back from metrics.jsonl, the run's one record
of numbers; `read_metrics` and `summarize_metrics` also serve reports and sweeps.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import socket
import sys

import jax
from absl import logging

from research.run import checkpoint
from research.run import run_log

RUN_FILE = "run.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "numpy")


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
  found = {"python": platform.python_version()}
  for package in PACKAGES:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      found[package] = None
  return found


def devices() -> dict:
  all_devices = jax.devices()
  return {"platform": all_devices[0].platform,
          "kinds": sorted({d.device_kind for d in all_devices}), "count": len(all_devices),
          "local_count": jax.local_device_count(), "process_count": jax.process_count()}


def numerics(config, where=None) -> dict:
  """The matmul precision, the convolution form and the loop form (research/backend.py)."""
  from research import backend, models

  where = where or backend.current()
  entry = models.MODELS.get(config.model.name)
  conv_impl = (config.model.get("conv_impl", "auto")  # a knob left out is at its default
               if entry and "conv_impl" in entry.knobs else None)  # models without convolutions
  return {"matmul_precision": config.get("matmul_precision", "default"),
          "conv_impl": where.conv_impl if conv_impl == "auto" else conv_impl,
          "static_trip_counts": where.static_trip_counts}


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl ([] when there is none); bad lines are skipped."""
  return run_log.read_records(os.path.join(workdir, run_log.METRICS_FILE))


def summarize_metrics(records: list[dict]) -> dict:
  """{"final": {split: last record}, "best": the evaluation with the highest accuracy}.
  Evaluations are keyed by the split they name (research/run/run_log.py)."""
  final = {}
  for record in records:
    final[record.get("split")] = record
  tests = [r for r in run_log.evaluations(records) if isinstance(r.get("accuracy"), float)]
  best = max(tests, key=lambda r: r["accuracy"]) if tests else None
  return {"final": final, "best": best}


def read(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, RUN_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write(workdir: str, info: dict) -> None:
  path = os.path.join(workdir, RUN_FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class RunRecord:
  """Context manager around the training loop: run.json at entry, updated at exit.

  `step` is set by the loop as it goes, so the exit record says where it stopped.
  """

  def __init__(self, workdir: str, config, start_step: int, dataset_info=None, where=None):
    self.workdir = workdir
    self.step = start_step
    self.enabled = jax.process_index() == 0
    self._info = {}
    if not self.enabled:
      return
    previous = read(workdir) or {}
    self._session = {"start_time": now(), "end_time": None, "start_step": start_step,
                     "end_step": None, "status": "running", "host": socket.gethostname(),
                     "command": sys.argv}
    self._info = {
        "workdir": os.path.abspath(workdir),
        "status": "running",
        "config": config.to_dict(),
        "seed": config.seed,
        # Name, image shape and class names: enough for predictions without the data.
        "dataset": dataclasses.asdict(dataset_info) if dataset_info else None,
        "code": checkpoint.code_version(),
        "versions": versions(),
        "devices": devices(),
        # The numerics the run had: they decide whether results carry over between machines.
        "numerics": numerics(config, where),
        "start_time": previous.get("start_time", self._session["start_time"]),
        "end_time": None,
        "sessions": [*previous.get("sessions", []), self._session],
        "final_metrics": previous.get("final_metrics"),
        "best_metrics": previous.get("best_metrics"),
    }

  def __enter__(self):
    if self.enabled:
      _write(self.workdir, self._info)
    return self

  def __exit__(self, exc_type, exc, traceback):
    if not self.enabled:
      return False
    if exc_type is None:
      status = "finished"
    elif issubclass(exc_type, SystemExit):
      status = "preempted"
    elif issubclass(exc_type, KeyboardInterrupt):
      status = "interrupted"
    else:
      status = "failed"
      self._session["error"] = f"{exc_type.__name__}: {exc}"
    summary = summarize_metrics(read_metrics(self.workdir))
    self._session.update(end_time=now(), end_step=self.step, status=status)
    self._info.update(status=status, end_time=self._session["end_time"],
                      final_metrics=summary["final"], best_metrics=summary["best"])
    try:
      _write(self.workdir, self._info)
    except OSError as e:  # e.g. the disk is full: the run's own error is the one to report
      logging.warning("Could not update %s: %s", os.path.join(self.workdir, RUN_FILE), e)
    return False
