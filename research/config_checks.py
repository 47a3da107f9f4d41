"""Checks a config before anything runs and resolves it into a schedule of steps.

Every duration is resolved here, in one vocabulary: `Schedule` says how many
steps the run has, and `is_time(step, every)` decides every periodic action.
"""

import dataclasses
import json
import os

import jax

from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class Schedule:
  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch

  def next_stop(self, step: int, max_chunk: int) -> int:
    """The next step at which the host must act (log, eval, checkpoint, end)."""
    stop = min(self.total_steps, step + max_chunk)
    for every in (self.log_every, self.eval_every, self.checkpoint_every):
      if every > 0:
        stop = min(stop, (step // every + 1) * every)
    return stop


def is_time(step: int, every: int) -> bool:
  return every > 0 and step > 0 and step % every == 0


def _require(condition: bool, field: str, value, accepted: str) -> None:
  if not condition:
    raise UserError(f"--config.{field}={value!r} is not accepted: {accepted}.")


def validate(config) -> None:
  """Fails with the field, the value and what is accepted; writes nothing."""
  devices = jax.device_count()
  _require(isinstance(config.batch_size, int) and config.batch_size > 0, "batch_size",
           config.batch_size, "a positive integer")
  _require(config.batch_size % devices == 0, "batch_size", config.batch_size,
           f"a multiple of the {devices} devices in this run")
  _require(isinstance(config.eval_batch_size, int) and config.eval_batch_size > 0
           and config.eval_batch_size % devices == 0, "eval_batch_size",
           config.eval_batch_size, f"a positive multiple of the {devices} devices in this run")
  _require(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs", config.num_epochs,
           "a positive number (or set num_train_steps > 0)")
  _require(config.num_train_steps >= 0, "num_train_steps", config.num_train_steps,
           "0 (use num_epochs) or a positive number of steps")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    _require(config[field] >= 0, field, config[field], "0 or a positive number of steps")
  _require(config.log_every_steps > 0, "log_every_steps", config.log_every_steps,
           "a positive number of steps")
  _require(config.keep_checkpoints > 0, "keep_checkpoints", config.keep_checkpoints,
           "a positive number")
  _require(0 <= config.label_smoothing < 1, "label_smoothing", config.label_smoothing,
           "a number in [0, 1)")
  _require(config.augment.crop_padding >= 0, "augment.crop_padding", config.augment.crop_padding,
           "0 (off) or a positive number of pixels")
  learning_rate = config.optimizer.learning_rate
  _require(isinstance(learning_rate, (int, float)) and learning_rate > 0,
           "optimizer.learning_rate", learning_rate, "a positive number")


def schedule(config, num_train_examples: int) -> Schedule:
  steps_per_epoch = num_train_examples // config.batch_size
  _require(steps_per_epoch > 0, "batch_size", config.batch_size,
           f"at most the {num_train_examples} training examples")
  total = config.num_train_steps or int(round(config.num_epochs * steps_per_epoch))
  return Schedule(
      steps_per_epoch=steps_per_epoch,
      total_steps=total,
      log_every=config.log_every_steps,
      eval_every=config.eval_every_steps or steps_per_epoch,
      checkpoint_every=config.checkpoint_every_steps,
  )


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def check_workdir_config(config, workdir: str, allow_change: bool) -> None:
  """A workdir belongs to one experiment: refuse a different config unless allowed."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      stored = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise UserError(f"{path} cannot be read ({e}); use a fresh --workdir.") from e
  given = _flatten(json.loads(config.to_json_best_effort()))
  changed = [f"  {key}: {stored.get(key, '<absent>')!r} in the workdir, {given.get(key, '<absent>')!r} now"
             for key in sorted(set(stored) | set(given)) if stored.get(key) != given.get(key)]
  if changed and not allow_change:
    raise UserError(f"The config differs from the one {workdir} was started with:\n"
                    + "\n".join(changed) + "\nUse another --workdir, or pass "
                    "--allow_config_change to continue this run with the new values.")
