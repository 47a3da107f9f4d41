"""Every config field: its kind, the values it accepts, its default and meaning.

`config_validation.validate` walks the resolved config through `fields_for(config)`, so a
value of the wrong type, out of range or not among the choices fails with one line
naming the field, the value and what is accepted, before anything is written. A config
field that has no entry is itself an error (tests/test_properties.py loads every config
in configs/ with every argument), so a new field cannot go unchecked.

Where the entries come from: the fields of the run itself (dataset, batches, lengths,
periodic actions) are declared in `FIELDS` below; the knobs of the chosen model
(research/models/), optimizer and schedule (research/run/optim.py) are declared by those
entries, next to their code, and joined in by `fields_for`. Nothing here repeats them.
A field a config leaves out is fine (configs may omit optional fields); only the fields
present are checked. Relations between fields (num_epochs or num_train_steps, batch
divisible by the device count, a schedule's boundaries) stay in config_validation.py,
and those that need the data's size in step_schedule.py.
"""

import dataclasses

from research import backend, metrics, models
from research.data import data_source, stream_examples
from research.knobs import (MAX_INT32, FRACTION as _FRACTION, Field, choice, flag, integer,
                            number, text)
from research.run import optim

FIELDS: dict[str, Field] = {
    "seed": integer(0, "initialization and data order"),
    # ---- dataset
    "dataset.name": text("fashion_mnist", "TFDS name, NAME[/CONFIG][:VERSION]"),
    "dataset.data_dir": text("", "TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)"),
    "dataset.train_split": text("train", "TFDS split to train on"),
    "dataset.eval_split": text("test", "TFDS split evaluated during training"),
    "dataset.image_size": integer(0, "> 0: images of this many pixels square (memory: shorter "
                                  "side resized, centre crop; stream: the ImageNet crops); 0 keeps "
                                  "the dataset's size", high=8192),
    "dataset.normalize": flag(False, "per-channel mean/std (True) or pixels in [0, 1] (False)"),
    "dataset.input": choice("memory", "whole splits on the devices, or read per batch",
                            data_source.INPUTS),
    "dataset.reader_threads": integer(0, "stream, workers=0: threads reading and decoding (0 = "
                                      "one per core)", high=stream_examples.MAX_THREADS),
    "dataset.workers": integer(0, "stream: processes decoding (-1 = one per core, 0 = threads "
                               "of the trainer); changes nothing computed", low=-1,
                               high=stream_examples.MAX_WORKERS),
    "dataset.crop_fraction": number(0.875, "stream: evaluation's centre crop is this fraction of "
                                    "the shorter side (224 of 256)", low=0.0, high=1.0,
                                    above=0.0),
    "dataset.min_crop_area": number(0.08, "stream: the Inception crop's smallest fraction of the "
                                    "image's area", low=0.0, high=1.0, above=0.0),
    "dataset.max_crop_area": number(1.0, "stream: the Inception crop's largest fraction of the "
                                    "image's area", low=0.0, high=1.0, above=0.0),
    # ---- model (name; the knobs come from the registry in research/models/__init__.py)
    "model.name": choice("cnn", "which model of the zoo", models.MODELS),
    # ---- optimizer (common fields; each optimizer's knobs come from research/run/optim.py)
    "optimizer.name": choice("adam_keras", "which optax optimizer", optim.OPTIMIZERS),
    # ---- schedule
    "schedule.name": choice("constant", "learning-rate schedule", optim.SCHEDULES),
    # ---- augmentation
    "augment.crop_padding": integer(0, "random crop after zero-padding by this many pixels",
                                    high=4096),
    "augment.flip": flag(False, "random horizontal flip"),
    "augment.random_resized_crop": flag(False, "Inception-style crop, resized back"),
    "label_smoothing": number(0.0, "label smoothing of the cross-entropy", **_FRACTION),
    # ---- batches, length, periodic actions
    "batch_size": integer(32, "global batch, over all devices", low=1),
    "eval_batch_size": integer(1000, "global eval batch", low=1),
    "microbatch_size": integer(0, "split each device's batch into micro-batches of this size "
                               "(0 = no split)"),
    "num_epochs": number(10, "training length in epochs", high=MAX_INT32),
    "num_train_steps": integer(0, "training length in steps; > 0 overrides num_epochs"),
    "log_every_steps": integer(125, "log the train metrics every this many steps", low=1),
    "eval_every_steps": integer(0, "evaluate every this many steps (0 = every epoch)"),
    "checkpoint_every_steps": integer(0, "checkpoint every this many steps (0 = at every "
                                      "evaluation)"),
    "keep_checkpoints": integer(3, "newest checkpoints kept (the best one as well)", low=1),
    "best_metric": metrics.best_metric_field(),
    # ---- initialization, evaluation, execution
    "init_from": text("", "another run's workdir to take parameters from ('' = none)"),
    "init_reinit_head": flag(False, "re-initialize the classifier if the class count differs"),
    "eval.checkpoint_step": text("latest", "--mode=eval: 'latest', 'best' or a step number"),
    "eval.split": text("test", "--mode=eval: the split to evaluate"),
    "deterministic": flag(False, "GPU: deterministic XLA reductions (slower)"),
    "shard_params": flag(False, "split params and optimizer state over the devices"),
    "profile_steps": text("", "'START,COUNT': a profiler trace of those steps ('' = off)"),
    "compile_cache": text("auto", "compiled programs kept in: 'auto' ($JAX_COMPILATION_CACHE_DIR, "
                          "else ~/.cache/research/jax), a folder, or 'off'"),
    "matmul_precision": choice("default", "precision of float32 matmuls and convolutions on "
                               "GPU/TPU", backend.MATMUL_PRECISIONS),
}

# The sections whose knobs come from a registry entry, chosen by the section's `name`.
REGISTRY_SECTIONS = {"model": models, "optimizer": optim}


def registry_fields(section: str, name: str) -> dict:
  """{"model.width": Field, ...}: the knobs entry `name` of `section` declares, with its
  defaults ({} for a name the registry does not know: `SECTION.name` fails on its own)."""
  registry = REGISTRY_SECTIONS[section]
  known = models.MODELS if section == "model" else optim.OPTIMIZERS
  if not isinstance(name, str) or name not in known:
    return {}
  common = optim.COMMON if section == "optimizer" else {}
  return {f"{section}.{knob}": field
          for knob, field in {**common, **registry.fields(name)}.items()}


def _registry_choices() -> dict:
  """The fields whose choices are a registry's names, read now (entries may be added)."""
  now = {"model.name": models.MODELS, "optimizer.name": optim.OPTIMIZERS,
         "schedule.name": optim.SCHEDULES, "best_metric": metrics.METRICS}
  return {key: dataclasses.replace(FIELDS[key], choices=tuple(registry))
          for key, registry in now.items()}


def fields_for(config) -> dict:
  """Every field `config` may hold: the run's own (FIELDS), the chosen model's and
  optimizer's knobs, and the schedules' (one group shared by every schedule)."""
  found = {**FIELDS, **_registry_choices()}
  for section in REGISTRY_SECTIONS:
    group = config.get(section) if hasattr(config, "get") else None
    if group is not None and hasattr(group, "get"):
      found.update(registry_fields(section, group.get("name")))
  found.update({f"schedule.{knob}": field for knob, field in optim.schedule_fields().items()})
  return found


def all_fields() -> dict:
  """Every field any config may hold, for help texts: each registry knob under the first
  entry that declares it (the chosen entry's own declaration is what validation uses)."""
  found = {**FIELDS, **_registry_choices()}
  for name in models.MODELS:
    found = {**registry_fields("model", name), **found}
  for name in optim.OPTIMIZERS:
    found = {**registry_fields("optimizer", name), **found}
  found.update({f"schedule.{knob}": field for knob, field in optim.schedule_fields().items()})
  return found


def flatten(config, prefix: str = "") -> dict:
  """{'optimizer.learning_rate': 0.001, ...} for every leaf of a ConfigDict (or dict)."""
  flat = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
