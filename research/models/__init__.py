"""The model zoo: `config.model.name` picks an entry of `MODELS`.

Every model is a flax.linen Module called as `model.apply(variables, images,
train=...)` on float images [N, H, W, C] and returns float32 logits
[N, num_classes]; `num_classes` (and the input shape, at init) come from the
dataset. Other `config.model` fields are the model's knobs, passed to its
constructor. Each entry declares its knobs (kind, range or choices, meaning) next to
the model's code, as `KNOBS` in its file; their defaults are the module's own field
defaults. The config schema, validation and the tests are built from these entries,
so adding a model is one file and one line below (docs/extending.md).
`dtype` is the compute dtype ("float32" or "bfloat16"); parameters stay float32.

  layers.py        the building blocks: Conv in its CPU and accelerator forms, dense, pooling
  cnn.py           the seed CNN of the Keras tutorial (the default) and its width/depth knobs
  mlp.py           a multilayer perceptron
  resnet.py        ResNets with BatchNorm, CIFAR-style and ImageNet-style
  wide_resnet.py   Wide ResNet
  vit.py           Vision Transformer
"""

import dataclasses
import functools
from typing import Callable

from research import knobs
from research.errors import UserError
from research.models import cnn, layers, mlp, resnet, vit
from research.models.wide_resnet import WideResNet

DTYPES = layers.DTYPES


@dataclasses.dataclass(frozen=True)
class Entry:
  constructor: Callable
  knobs: dict  # knob name -> knobs.Field, declared next to the model's code
  smoke: dict = dataclasses.field(default_factory=dict)  # knob values for a test-sized model


# ResNets and the WideResNet (resnet.py, wide_resnet.py) declare their knobs here.
_BN_SYNC = {"bn_sync": knobs.choice(knobs.OWN, "BatchNorm statistics: 'global' (the whole "
                                    "batch's, all-reduced over devices) or 'local' (each "
                                    "device's own)", resnet.BN_SYNCS)}
_RESNET = {
    "width": knobs.integer(knobs.OWN, "channels of the first stage", low=1, high=65536),
    "stem": knobs.choice(knobs.OWN, "the first layers: 7x7/2 conv and max-pool (imagenet), "
                         "3x3/1 conv (cifar), or 3x3/1 conv and a 2x2 max-pool (pool)",
                         ("imagenet", "cifar", "pool")),
    **layers.CONV_KNOBS,
    **_BN_SYNC,
}
_WIDE_RESNET = {
    "depth": knobs.integer(knobs.OWN, "layers, 6n+4 (10, 16, 22, 28, 40)", low=10, high=1000),
    "width": knobs.integer(knobs.OWN, "widening factor of the stages (16, 32, 64 channels)",
                           low=1, high=65536),
    "dropout_rate": knobs.number(knobs.OWN, "dropout probability", **knobs.FRACTION),
    **layers.CONV_KNOBS,
    **_BN_SYNC,
}

MODELS = {
    "cnn": Entry(cnn.CNN, cnn.KNOBS, {"conv_features": (8, 16), "dense_features": 16}),
    "mlp": Entry(mlp.MLP, mlp.KNOBS, {"hidden_features": (32,), "dropout_rate": 0.1}),
    "resnet8": Entry(resnet.resnet8, _RESNET, {"width": 4}),
    "resnet14": Entry(resnet.resnet14, _RESNET, {"width": 4}),
    "resnet20": Entry(resnet.resnet20, _RESNET, {"width": 4}),
    "resnet32": Entry(resnet.resnet32, _RESNET, {"width": 2}),
    "resnet56": Entry(resnet.resnet56, _RESNET, {"width": 2}),
    "resnet18": Entry(resnet.resnet18, _RESNET, {"width": 4}),
    "resnet34": Entry(resnet.resnet34, _RESNET, {"width": 2}),
    "resnet50": Entry(resnet.resnet50, _RESNET, {"width": 2, "stem": "cifar"}),
    "wide_resnet": Entry(WideResNet, _WIDE_RESNET, {"depth": 10, "width": 1,
                                                     "dropout_rate": 0.1}),
    "vit_ti": Entry(vit.vit_ti, vit.KNOBS, {"patch_size": 7, "width": 16, "depth": 2,
                                            "num_heads": 2}),
    "vit_s": Entry(vit.vit_s, vit.KNOBS, {"patch_size": 4, "width": 16, "depth": 1,
                                          "num_heads": 4, "mlp_dim": 32}),
}


def _lookup(name: str) -> Entry:
  if not isinstance(name, str) or name not in MODELS:
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
    values["dtype"] = next(key for key, dtype in DTYPES.items() if dtype == values["dtype"])
  return values


def fields(name: str) -> dict:
  """{knob: knobs.Field} of model `name`, with the model's own defaults."""
  own = defaults(name)
  return {knob: knobs.with_default(field, own[knob]) for knob, field in _lookup(name).knobs.items()}


def check(model_config) -> dict:
  """The knobs set in `model_config`, each checked against the model's declaration."""
  name = model_config.name
  entry = _lookup(name)
  kwargs = {k: v for k, v in model_config.items() if k != "name"}
  unknown = sorted(set(kwargs) - set(entry.knobs))
  if unknown:
    raise UserError(f"model.{unknown[0]} does not apply to model {name!r}; its knobs are: "
                    f"{', '.join(entry.knobs)}.")
  for knob, value in kwargs.items():
    field = entry.knobs[knob]
    if field.problem(value):
      raise UserError(f"model.{knob}={value!r} is not accepted: {field.accepted()} "
                      f"({field.meaning}).")
  if name == "wide_resnet" and "depth" in kwargs and (
      kwargs["depth"] < 10 or (kwargs["depth"] - 4) % 6):
    raise UserError(f"model.depth={kwargs['depth']} is not accepted for wide_resnet: use 6n+4 "
                    "(10, 16, 22, 28, 40).")
  return kwargs


def build(model_config, num_classes: int):
  """Returns the flax Module named by `model_config.name`, with its knobs set."""
  name = model_config.name
  kwargs = check(model_config)
  for knob, value in kwargs.items():
    if isinstance(value, list):  # module fields must be hashable
      kwargs[knob] = tuple(value)
  if "dtype" in kwargs:
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  return MODELS[name].constructor(num_classes=num_classes, **kwargs)


def check_fits(model_config, image_shape, initialize):
  """Returns `initialize()` (the model's init traced for shapes only, e.g. by
  jax.eval_shape), turning a shape failure into a UserError naming the model and the
  input shape: the one place a built model meets the dataset's images."""
  try:
    return initialize()
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
