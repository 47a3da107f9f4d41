"""The model zoo: `config.model.name` picks an entry of `MODELS`.

Every model is a flax.linen Module called as `model.apply(variables, images,
train=...)` on float images [N, H, W, C] and returns float32 logits
[N, num_classes]; `num_classes` (and the input shape, at init) come from the
dataset. Other `config.model` fields are the model's knobs, passed to its
constructor; each entry lists the knobs it accepts, and any other field fails.
`dtype` is the compute dtype ("float32" or "bfloat16"); parameters stay float32.
"""

import dataclasses
import functools
from typing import Callable

import jax.numpy as jnp

from research.errors import UserError
from research.models import layers, resnet, vit
from research.models.cnn import CNN
from research.models.mlp import MLP
from research.models.wide_resnet import WideResNet


@dataclasses.dataclass(frozen=True)
class Entry:
  constructor: Callable
  knobs: tuple[str, ...]


_CONV = ("conv_impl", "dtype")
_NORM = ("bn_sync",)  # BatchNorm models: whose statistics a step uses (resnet.py)
_VIT = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "dropout_rate", "dtype")

MODELS = {
    "cnn": Entry(CNN, ("conv_features", "dense_features", *_CONV)),
    "mlp": Entry(MLP, ("hidden_features", "dropout_rate", "dtype")),
    "resnet8": Entry(resnet.resnet8, ("width", "stem", *_CONV, *_NORM)),
    "resnet14": Entry(resnet.resnet14, ("width", "stem", *_CONV, *_NORM)),
    "resnet20": Entry(resnet.resnet20, ("width", "stem", *_CONV, *_NORM)),
    "resnet32": Entry(resnet.resnet32, ("width", "stem", *_CONV, *_NORM)),
    "resnet56": Entry(resnet.resnet56, ("width", "stem", *_CONV, *_NORM)),
    "resnet18": Entry(resnet.resnet18, ("width", "stem", *_CONV, *_NORM)),
    "resnet34": Entry(resnet.resnet34, ("width", "stem", *_CONV, *_NORM)),
    "resnet50": Entry(resnet.resnet50, ("width", "stem", *_CONV, *_NORM)),
    "wide_resnet": Entry(WideResNet, ("depth", "width", "dropout_rate", *_CONV, *_NORM)),
    "vit_ti": Entry(vit.vit_ti, _VIT),
    "vit_s": Entry(vit.vit_s, _VIT),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Knobs that take one of a few values, checked before anything is built.
_CHOICES = {"dtype": tuple(DTYPES), "conv_impl": layers.IMPLS,
            "stem": ("imagenet", "cifar", "pool"), "bn_sync": resnet.BN_SYNCS}


def _lookup(name: str) -> Entry:
  if name not in MODELS:
    raise UserError(f"model.name={name!r} is unknown. Known models: {', '.join(MODELS)}.")
  return MODELS[name]


def defaults(name: str) -> dict:
  """The knobs of model `name` and their default values (dtype as its name).

  Recipes use this to put a model's knobs in the config, so that each one can
  be overridden from the command line (`--config.model.width=32`).
  """
  entry = _lookup(name)
  constructor = entry.constructor
  preset = dict(constructor.keywords) if isinstance(constructor, functools.partial) else {}
  module = constructor.func if isinstance(constructor, functools.partial) else constructor
  fields = {f.name: f.default for f in dataclasses.fields(module)}
  values = {knob: preset.get(knob, fields[knob]) for knob in entry.knobs}
  if "dtype" in values:
    values["dtype"] = "float32"
  return values


def build(model_config, num_classes: int):
  """Returns the flax Module named by `model_config.name`, with its knobs set."""
  name = model_config.name
  entry = _lookup(name)
  kwargs = {k: v for k, v in model_config.items() if k != "name"}
  unknown = sorted(set(kwargs) - set(entry.knobs))
  if unknown:
    raise UserError(f"model.{unknown[0]} does not apply to model {name!r}; its knobs are: "
                    f"{', '.join(entry.knobs)}.")
  for knob, choices in _CHOICES.items():
    if knob in kwargs and kwargs[knob] not in choices:
      raise UserError(f"model.{knob}={kwargs[knob]!r} is not accepted; use one of "
                      f"{', '.join(choices)}.")
  for knob, value in kwargs.items():
    if isinstance(value, list):  # module fields must be hashable
      kwargs[knob] = tuple(value)
  if "dtype" in kwargs:
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  if name == "wide_resnet" and "depth" in kwargs and (
      kwargs["depth"] < 10 or (kwargs["depth"] - 4) % 6):
    raise UserError(f"model.depth={kwargs['depth']} is not accepted for wide_resnet: use 6n+4 "
                    "(10, 16, 22, 28, 40).")
  return entry.constructor(num_classes=num_classes, **kwargs)
