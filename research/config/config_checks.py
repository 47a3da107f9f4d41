"""Checks a config before anything runs and resolves it into a schedule of steps.

Every duration is resolved here, in one vocabulary: `Schedule` says how many
steps the run has, and `is_time(step, every)` decides every periodic action.
"""

import dataclasses
import json
import os

import jax
import ml_collections
from absl import logging

from research import models
from research.config import config_schema
from research.run import optim, profiling
from research.errors import UserError

MAX_STEPS = config_schema.MAX_INT32  # TrainState.step is an int32


@dataclasses.dataclass(frozen=True)
class Schedule:
  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch

  @property
  def max_chunk(self) -> int:
    """The most steps between two stops: the rows of the one compiled train loop."""
    return min([self.total_steps] + [every for every in (
        self.log_every, self.eval_every, self.checkpoint_every) if every > 0])

  def next_stop(self, step: int) -> int:
    """The next step at which the host must act (log, eval, checkpoint, end).

    Stops depend on the step alone, so a resumed run compiles and runs exactly
    the same chunks of steps as an uninterrupted one.
    """
    stop = self.total_steps
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
  """Fails with the field, the value and what is accepted; writes nothing.

  Every field is checked against its entry in config_schema.FIELDS first (type, range,
  choices); the checks below are the relations between fields and the registries' own.
  """
  check_fields(config)
  # The train batch is global and split evenly over every device of every process; the
  # eval batch is rounded up to a multiple of the device count (masked padding).
  _require(config.batch_size % jax.device_count() == 0, "batch_size", config.batch_size,
           _divisible_by_devices(config.batch_size))
  _require(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs", config.num_epochs,
           "a positive number (or set num_train_steps > 0)")
  checkpoint_step = str(config.eval.checkpoint_step).strip()
  _require(checkpoint_step in ("latest", "best") or checkpoint_step.isdigit(),
           "eval.checkpoint_step", config.eval.checkpoint_step,
           "'latest', 'best' or a step number")
  # Names and knobs fail here, before any data is read: the registries list what exists.
  profiling.parse(config.profile_steps)
  models.build(config.model, num_classes=1)
  optim.build_optimizer(config.optimizer)
  optim.check(config.optimizer, config.schedule)


def check_fields(config) -> None:
  """Each field of `config` against its declaration (config_schema.fields_for: the run's
  own fields, and the knobs the chosen model, optimizer and schedules declare); a field
  without one is an error."""
  declared = config_schema.fields_for(config)
  flat = config_schema.flatten(config)
  # The registry names first: an unknown name says so before its section's knobs are read.
  for name in sorted(flat, key=lambda name: not name.endswith(".name")):
    value, field = flat[name], declared.get(name)
    if field is None and name.split(".")[0] == "model":
      models.check(config.model)  # names the model's knobs
    if field is None and name.split(".")[0] == "optimizer":
      optim.check(config.optimizer, None)  # names the optimizer's knobs
    if field is None:
      raise UserError(f"The config field {name} (= {value!r}) has no entry in "
                      "research/config/config_schema.py, nor is it a knob a model, optimizer or "
                      "schedule declares, so its values cannot be checked: declare it (kind, "
                      "range, default, meaning), or remove the field from the config.")
    if field.problem(value):
      raise UserError(f"--config.{name}={value!r} is not accepted: {field.accepted()} "
                      f"({field.meaning}).")


def check_eval_batch_size(config, num_eval_examples: int) -> None:
  """A batch larger than the whole eval split only pads with zeros. Both are rounded up
  to a multiple of the device count (as `mesh.rounded_to_devices` rounds the batch), so
  any size up to the split's is accepted on every device count."""
  devices = jax.device_count()
  largest = -(-num_eval_examples // devices) * devices
  _require(config.eval_batch_size <= largest, "eval_batch_size", config.eval_batch_size,
           f"at most {largest} (the eval split has {num_eval_examples} examples)")


def check_model_fits(model_config, image_shape, initialize) -> None:
  """Runs `initialize()` (shapes only, e.g. jax.eval_shape of the model's init) and turns
  a shape failure into a UserError naming the model and the input shape."""
  try:
    initialize()
  # flax/lax shape errors; flax asserts some (a width that its attention heads cannot split)
  except (TypeError, ValueError, ZeroDivisionError, AssertionError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    settings = ", ".join(f"model.{key}={value!r}" for key, value in model_config.items())
    raise UserError(
        f"The model ({settings}) cannot take images of shape {tuple(image_shape)} "
        f"(height, width, channels): initializing it fails with {type(e).__name__}: "
        f"{first_line[:300]}. Use model settings that fit together and fit this image size (a "
        "downsampling the image allows, a width its attention heads divide), or a dataset "
        "with larger images.") from e


def _divisible_by_devices(size: int) -> str:
  devices = jax.device_count()
  below, above = size // devices * devices, (size // devices + 1) * devices
  nearest = " or ".join(str(n) for n in (below, above) if n > 0)
  return (f"the global batch is split evenly over the {devices} devices of this run "
          f"({jax.process_count()} process(es) x {jax.local_device_count()} local devices), so it "
          f"must be a multiple of {devices}, e.g. {nearest}")


def microbatch_count(config) -> int:
  """How many micro-batches each step's batch is split into (config.microbatch_size)."""
  per_device = config.batch_size // jax.device_count()
  size = config.microbatch_size
  if size == 0 or size >= per_device:
    return 1
  _require(size > 0 and per_device % size == 0, "microbatch_size", size,
           f"0 (no split) or a divisor of the per-device batch {per_device}")
  return per_device // size


def schedule(config, num_train_examples: int) -> Schedule:
  steps_per_epoch = num_train_examples // config.batch_size
  _require(steps_per_epoch > 0, "batch_size", config.batch_size,
           f"at most the {num_train_examples} training examples")
  total = config.num_train_steps or int(round(config.num_epochs * steps_per_epoch))
  _require(total <= MAX_STEPS, "num_epochs", config.num_epochs,
           f"at most {MAX_STEPS // steps_per_epoch} epochs ({MAX_STEPS} steps) at this batch size")
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


# Fields that change how a run executes, never what it computes: any value resumes.
EXECUTION_ONLY = ("dataset.reader_threads", "dataset.workers", "compile_cache")


_ABSENT = object()


def _same(stored, given) -> bool:
  """Equal as config.json holds them (tuples are JSON lists)."""
  plain = lambda value: list(value) if isinstance(value, tuple) else value
  return plain(stored) == plain(given)


def changed_fields(stored_config: dict, config) -> list[str]:
  """What differs between the config a workdir stored and `config`, as lines.

  Config evolution: a field the stored config lacks (newer code added it) is no change
  when `config` holds its declared default; a field `config` lacks is no change when the
  stored value was its default; a stored field the current code declares nowhere is no
  longer read (named in a warning, not a change)."""
  stored = _flatten(stored_config)
  given = _flatten(json.loads(config.to_json_best_effort()))
  declared = config_schema.fields_for(config)
  declared_then = config_schema.fields_for(ml_collections.ConfigDict(stored_config))
  unknown = sorted(key for key in stored if key not in given and key not in declared
                   and key not in declared_then)
  if unknown:
    logging.warning("The workdir's config has fields this code no longer reads (ignored): %s.",
                    ", ".join(unknown))
  changed = []
  for key in sorted(set(stored) | set(given)):
    before, now = stored.get(key, _ABSENT), given.get(key, _ABSENT)
    if key in EXECUTION_ONLY or key in unknown or (before is not _ABSENT and now is not _ABSENT
                                                   and _same(before, now)):
      continue
    field = declared.get(key) or declared_then.get(key)
    default = field.default if field is not None else _ABSENT
    if (before is _ABSENT and _same(now, default)) or (now is _ABSENT and _same(before, default)):
      continue  # a field added or dropped at its default computes what it did
    changed.append(f"  {key}: {'<absent>' if before is _ABSENT else repr(before)} in the "
                   f"workdir, {'<absent>' if now is _ABSENT else repr(now)} now")
  return changed


def read_stored(stored_config: dict):
  """A config a workdir stored (config.json, or a checkpoint's meta), read through the
  current schema: fields of the run, the optimizer's common fields and the schedules'
  that newer code added take their declared defaults; fields the code no longer declares
  are dropped, named in a warning. A ConfigDict, like the one the run was trained with."""
  config = ml_collections.ConfigDict(stored_config)
  declared = config_schema.fields_for(config)
  flat = config_schema.flatten(config)
  unknown = sorted(key for key in flat if key not in declared)
  if unknown:
    logging.warning("The stored config has fields this code no longer reads (ignored): %s.",
                    ", ".join(unknown))
  tree = json.loads(config.to_json_best_effort())
  for key in unknown:
    *groups, leaf = key.split(".")
    node = tree
    for group in groups:
      node = node[group]
    del node[leaf]
  for key, field in declared.items():
    section = key.split(".")[0]
    if key in flat or (section in config_schema.REGISTRY_SECTIONS
                       and key.split(".", 1)[1] not in optim.COMMON):
      continue  # a model's or optimizer's own knobs default in the code itself
    *groups, leaf = key.split(".")
    node = tree
    for group in groups:
      node = node.setdefault(group, {})
    node[leaf] = field.default
  return ml_collections.ConfigDict(tree)


def check_workdir_config(config, workdir: str, allow_change: bool) -> None:
  """A workdir belongs to one experiment: refuse a different config unless allowed."""
  found = workdir_config(workdir, repair=jax.process_index() == 0)
  if found is None:
    return
  changed = changed_fields(found, config)
  if changed and not allow_change:
    raise UserError(f"The config differs from the one {workdir} was started with:\n"
                    + "\n".join(changed) + "\nUse another --workdir, or pass "
                    "--allow_config_change to continue this run with the new values.")


def workdir_config(workdir: str, repair: bool) -> dict | None:
  """The config `workdir` was started with (WORKDIR/config.json), or None if it has none.

  A config.json that cannot be read (truncated, overwritten) is rebuilt from the config
  stored in the newest readable checkpoint's `meta`, with a warning; with `repair` the
  rebuilt config replaces it (the damaged file is kept beside it, as config.json.unreadable).
  A UserError when no checkpoint holds one either.
  """
  from research.run import checkpoint  # the checkpoints are only read when config.json is damaged

  path = os.path.join(workdir, "config.json")
  if not os.path.lexists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
    if not isinstance(stored, dict):
      raise ValueError("not a JSON object")
    return stored
  except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
    problem = f"{type(e).__name__}: {str(e)[:200]}"
  checkpoints = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    found = checkpoints.stored_config()
  finally:
    checkpoints.close()
  if found is None:
    raise UserError(f"{path} cannot be read ({problem}), and no checkpoint in "
                    f"{checkpoints.directory} holds the config to rebuild it from. Move it away "
                    "to start this workdir afresh, or use another --workdir.")
  step, stored = found
  kept = ""
  if repair:
    os.replace(path, path + ".unreadable")
    with open(path + ".tmp", "w") as f:
      json.dump(stored, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    kept = f" and wrote it back (the damaged file is kept as {path}.unreadable)"
  logging.warning("%s cannot be read (%s): using the config stored in checkpoint step %d%s.",
                  path, problem, step, kept)
  return stored
