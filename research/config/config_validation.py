"""Validation of a resolved config before anything runs: every mistake, named, up front.

`validate(config)` checks each field against its declaration (config_schema), the
relations between fields, and the registries' names and knobs (models, optimizers,
schedules), without building a model, an optimizer or reading any data: the run
builds each once. It returns a `ValidConfig`, which is what
`train.train_and_evaluate` takes, so every caller (main, studies, tests) validates
first. Checks that need the data's size (the step schedule, the eval batch) or the
built model (does it fit the images) run where those exist, in the run.
"""

import dataclasses

import jax
import ml_collections

from research import models
from research.config import config_schema, workdir_config
from research.errors import UserError, require
from research.run import optim, profiling


@dataclasses.dataclass(frozen=True)
class ValidConfig:
  """A config that passed `validate`: what `train.train_and_evaluate` takes."""

  config: ml_collections.ConfigDict

  def check_workdir(self, workdir: str, allow_change: bool) -> None:
    """Refuses the config when `workdir` was started with a different one (unless
    `allow_change`); a damaged WORKDIR/config.json is rebuilt from its checkpoints.
    Training calls it while holding the workdir's lock."""
    workdir_config.check(self.config, workdir, allow_change)


def validate(config) -> ValidConfig:
  """Fails with the field, the value and what is accepted; writes nothing.

  Every field is checked against its entry in config_schema.FIELDS first (type, range,
  choices); the checks below are the relations between fields and the registries' own.
  """
  check_fields(config)
  # The train batch is global and split evenly over every device of every process; the
  # eval batch is rounded up to a multiple of the device count (masked padding).
  require(config.batch_size % jax.device_count() == 0, "batch_size", config.batch_size,
          _divisible_by_devices(config.batch_size))
  require(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs", config.num_epochs,
          "a positive number (or set num_train_steps > 0)")
  checkpoint_step = str(config.eval.checkpoint_step).strip()
  require(checkpoint_step in ("latest", "best") or checkpoint_step.isdigit(),
          "eval.checkpoint_step", config.eval.checkpoint_step,
          "'latest', 'best' or a step number")
  # Names and knobs fail here, before any data is read: the registries list what exists.
  profiling.parse(config.profile_steps)
  models.check(config.model)
  optim.check(config.optimizer, config.schedule)
  return ValidConfig(config)


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
      optim.check_knobs(config.optimizer)  # names the optimizer's knobs
    if field is None:
      raise UserError(f"The config field {name} (= {value!r}) has no entry in "
                      "research/config/config_schema.py, nor is it a knob a model, optimizer or "
                      "schedule declares, so its values cannot be checked: declare it (kind, "
                      "range, default, meaning), or remove the field from the config.")
    if field.problem(value):
      raise UserError(f"--config.{name}={value!r} is not accepted: {field.accepted()} "
                      f"({field.meaning}).")


def _divisible_by_devices(size: int) -> str:
  devices = jax.device_count()
  below, above = size // devices * devices, (size // devices + 1) * devices
  nearest = " or ".join(str(n) for n in (below, above) if n > 0)
  return (f"the global batch is split evenly over the {devices} devices of this run "
          f"({jax.process_count()} process(es) x {jax.local_device_count()} local devices), so it "
          f"must be a multiple of {devices}, e.g. {nearest}")
