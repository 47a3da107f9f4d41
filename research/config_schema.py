"""Every config field in one table: its kind, the values it accepts, its default and meaning.

`config_checks.validate` walks the resolved config through `FIELDS`, so a value of the
wrong type, out of range or not among the choices fails with one line naming the field,
the value and what is accepted, before anything is written. A config field that has no
entry here is itself an error (tests/test_properties.py loads every config in configs/
with every argument), so a new field cannot go unchecked: add its entry below.

Why a table beside configs/default.py rather than inside it: default.py stays the
readable recipe users copy, and this table also covers fields default.py does not set
(the knobs each model and optimizer of the registries bring).
Each entry repeats default.py's default (tests/test_properties.py checks they agree);
for registry knobs the default is the model's or optimizer's own (`REGISTRY_DEFAULT`).
A field a config leaves out is fine (configs may omit optional fields); only the
fields present are checked. Relations between fields (num_epochs or num_train_steps,
batch divisible by the device count, a schedule's boundaries) stay in config_checks.py.
"""

import dataclasses
import math
from typing import Any

from research import input_pipeline, models, optim
from research.models import layers

MAX_INT32 = 2**31 - 1  # step counters and seeds are int32 on the devices
REGISTRY_DEFAULT = "(the model's or optimizer's own)"


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field. `kind` is "int", "number", "bool", "text", "choice", "ints" or
  "numbers" (tuples); numbers lie in [low, high], with `below` and `above` as exclusive
  bounds where set."""

  kind: str
  default: Any
  meaning: str
  low: float | None = None
  high: float | None = None
  below: float | None = None
  above: float | None = None  # exclusive lower bound (instead of `low`)
  choices: tuple = ()
  optional: bool = False  # None accepted (e.g. "no momentum")

  def accepted(self) -> str:
    """What the field accepts, in words."""
    if self.kind == "bool":
      text = "True or False"
    elif self.kind == "text":
      text = "text"
    elif self.kind == "choice":
      text = "one of " + ", ".join(repr(choice) for choice in self.choices)
    elif self.kind in ("int", "ints"):
      bounds = f"from {_show(self.low)} to {_show(self.high)}"
      text = f"an integer {bounds}" if self.kind == "int" else f"a tuple of integers, each {bounds}"
    else:
      text = ("a finite number " if self.kind == "number"
              else "a tuple of finite numbers, each ") + self._interval()
    return text + (", or None" if self.optional else "")

  def _interval(self) -> str:
    opening = f"[{_show(self.low)}" if self.low is not None else f"({_show(self.above)}"
    if self.high is None and self.below is None:
      return ">= " + opening[1:] if opening[0] == "[" else "> " + opening[1:]
    closing = f"{_show(self.high)}]" if self.high is not None else f"{_show(self.below)})"
    return f"in {opening}, {closing}"

  def problem(self, value) -> str | None:
    """None when `value` is accepted, else what is wrong, in a few words."""
    if value is None:
      return None if self.optional else "None is not a value here"
    if self.kind == "bool":
      return None if isinstance(value, bool) else "not True or False"
    if self.kind == "text":
      return None if isinstance(value, str) else "not text"
    if self.kind == "choice":
      return None if _hashable(value) and value in self.choices else "not one of the choices"
    if self.kind in ("ints", "numbers"):
      if not isinstance(value, (tuple, list)):
        return "not a tuple"
      for item in value:
        problem = self._number_problem(item, integer=self.kind == "ints")
        if problem:
          return f"an element {problem}"
      return None
    return self._number_problem(value, integer=self.kind == "int")

  def _number_problem(self, value, integer: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return "is not a number"
    if integer and not isinstance(value, int):
      return "is not an integer"
    if not math.isfinite(value):
      return "is not finite"
    if ((self.low is not None and value < self.low) or (self.high is not None and value > self.high)
        or (self.below is not None and value >= self.below)
        or (self.above is not None and value <= self.above)):
      return "is out of range"
    return None


def integer(default, meaning, low=0, high=MAX_INT32):
  return Field("int", default, meaning, low=low, high=high)


def number(default, meaning, low=0.0, high=None, below=None, above=None, optional=False):
  if above is not None:
    low = None
  return Field("number", default, meaning, low=low, high=high, below=below, above=above,
               optional=optional)


def flag(default, meaning):
  return Field("bool", default, meaning)


def text(default, meaning):
  return Field("text", default, meaning)


def choice(default, meaning, choices):
  return Field("choice", default, meaning, choices=tuple(choices))


def _show(bound) -> str:
  return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _hashable(value) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


_FRACTION = dict(low=0.0, below=1.0)
_STEMS = ("imagenet", "cifar", "pool")  # research/models/resnet.py `_stem`

FIELDS: dict[str, Field] = {
    "seed": integer(0, "initialization and data order"),
    # ---- dataset
    "dataset.name": text("fashion_mnist", "TFDS name, NAME[/CONFIG][:VERSION]"),
    "dataset.data_dir": text("", "TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)"),
    "dataset.train_split": text("train", "TFDS split to train on"),
    "dataset.eval_split": text("test", "TFDS split evaluated during training"),
    "dataset.image_size": integer(0, "> 0: resize (shorter side, centre crop) to this many "
                                  "pixels; 0 keeps the dataset's size", high=8192),
    "dataset.normalize": flag(False, "per-channel mean/std (True) or pixels in [0, 1] (False)"),
    "dataset.input": choice("memory", "whole splits on the devices, or read per batch",
                            input_pipeline.INPUTS),
    "dataset.reader_threads": integer(0, "stream: threads reading and decoding (0 = one per "
                                      "core)", high=input_pipeline.MAX_THREADS),
    # ---- model (name; the knobs come from the registry in research/models/__init__.py)
    "model.name": choice("cnn", "which model of the zoo", models.MODELS),
    "model.conv_features": Field("ints", REGISTRY_DEFAULT, "channels of each conv layer", low=1,
                                 high=65536),
    "model.dense_features": integer(REGISTRY_DEFAULT, "units of the hidden dense layer", low=1,
                                    high=2**20),
    "model.hidden_features": Field("ints", REGISTRY_DEFAULT, "units of each hidden layer", low=1,
                                   high=2**20),
    "model.dropout_rate": number(REGISTRY_DEFAULT, "dropout probability", **_FRACTION),
    "model.width": integer(REGISTRY_DEFAULT, "channels of the first stage / embedding width",
                           low=1, high=65536),
    "model.depth": integer(REGISTRY_DEFAULT, "number of layers or blocks", low=1, high=1000),
    "model.stem": choice(REGISTRY_DEFAULT, "the ResNet's first layers", _STEMS),
    "model.bn_sync": choice(REGISTRY_DEFAULT, "BatchNorm statistics: 'global' (the whole "
                            "batch's) or 'local' (each device's own)", ("global", "local")),
    "model.patch_size": integer(REGISTRY_DEFAULT, "ViT patch side in pixels", low=1, high=8192),
    "model.num_heads": integer(REGISTRY_DEFAULT, "attention heads", low=1, high=65536),
    "model.mlp_dim": integer(REGISTRY_DEFAULT, "ViT MLP width (0 = 4 x width)", high=2**20),
    "model.conv_impl": choice(REGISTRY_DEFAULT, "convolution form (auto picks per backend)",
                              layers.IMPLS),
    "model.dtype": choice(REGISTRY_DEFAULT, "compute dtype (parameters stay float32)",
                          models.DTYPES),
    # ---- optimizer (common fields; each optimizer's knobs come from research/optim.py)
    "optimizer.name": choice("adam_keras", "which optax optimizer", optim.OPTIMIZERS),
    "optimizer.learning_rate": number(1e-3, "peak learning rate", above=0.0),
    "optimizer.weight_decay": number(0.0, "on kernels only (0 = off)"),
    "optimizer.grad_clip_norm": number(0.0, "clip the global gradient norm (0 = off)"),
    "optimizer.grad_accum_steps": integer(1, "one update per this many batches", low=1,
                                          high=MAX_INT32),
    "optimizer.momentum": number(REGISTRY_DEFAULT, "momentum (None = off)", optional=True,
                                 **_FRACTION),
    "optimizer.nesterov": flag(REGISTRY_DEFAULT, "Nesterov momentum"),
    "optimizer.b1": number(REGISTRY_DEFAULT, "first-moment decay", **_FRACTION),
    "optimizer.b2": number(REGISTRY_DEFAULT, "second-moment decay", **_FRACTION),
    "optimizer.eps": number(REGISTRY_DEFAULT, "added to the denominator", high=1.0),
    "optimizer.decay": number(REGISTRY_DEFAULT, "RMSprop's squared-gradient decay", **_FRACTION),
    "optimizer.centered": flag(REGISTRY_DEFAULT, "centered RMSprop"),
    "optimizer.decay_rate": number(REGISTRY_DEFAULT, "Adafactor's second-moment decay rate",
                                   high=1.0),
    "optimizer.clipping_threshold": number(REGISTRY_DEFAULT, "Adafactor's update clipping",
                                           optional=True),
    "optimizer.multiply_by_parameter_scale": flag(REGISTRY_DEFAULT,
                                                  "Adafactor's relative step size"),
    # ---- schedule
    "schedule.name": choice("constant", "learning-rate schedule", optim.SCHEDULES),
    "schedule.warmup_steps": integer(0, "linear warmup length in updates (0 = none)"),
    "schedule.warmup_epochs": number(0.0, "linear warmup length in epochs (0 = none)",
                                     high=MAX_INT32),
    "schedule.boundaries_epochs": Field("numbers", (), "piecewise: decay points in epochs",
                                        low=0.0, high=MAX_INT32),
    "schedule.boundaries_steps": Field("ints", (), "piecewise: decay points in updates", low=0,
                                       high=MAX_INT32),
    "schedule.decay_factor": number(0.1, "piecewise: learning-rate factor at each boundary",
                                    high=1.0),
    "schedule.end_learning_rate_factor": number(0.0, "cosine: final / peak learning rate",
                                                high=1.0),
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
    "best_metric": choice("accuracy", "picks the 'best' checkpoint", ("accuracy", "loss")),
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
                               "GPU/TPU", ("default", "high", "highest")),
}

def flatten(config, prefix: str = "") -> dict:
  """{'optimizer.learning_rate': 0.001, ...} for every leaf of a ConfigDict (or dict)."""
  flat = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat
