"""The model zoo: `config.model.name` picks a constructor from `MODELS`.

Every model is a flax.linen Module called as `model.apply(variables, images,
train=...)` on float images [N, H, W, C] and returns logits [N, num_classes].
Extra `config.model` fields are passed to the constructor as keyword arguments.
"""

import dataclasses

import jax.numpy as jnp

from research.errors import UserError
from research.models.cnn import CNN

MODELS = {
    "cnn": CNN,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(model_config, num_classes: int):
  """Returns the flax Module named by `model_config.name`."""
  name = model_config.name
  if name not in MODELS:
    raise UserError(f"model.name={name!r} is unknown. Known models: {', '.join(sorted(MODELS))}.")
  constructor = MODELS[name]
  kwargs = {k: v for k, v in model_config.items() if k != "name"}
  if "dtype" in kwargs:
    if kwargs["dtype"] not in _DTYPES:
      raise UserError(f"model.dtype={kwargs['dtype']!r} is not supported; use one of "
                      f"{', '.join(_DTYPES)}.")
    kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
  known = {f.name for f in dataclasses.fields(constructor)} - {"parent", "name", "num_classes"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise UserError(f"model.{unknown[0]} does not apply to model {name!r}; its knobs are: "
                    f"{', '.join(sorted(known))}.")
  if isinstance(kwargs.get("conv_features"), (list, tuple)):
    kwargs["conv_features"] = tuple(kwargs["conv_features"])
  return constructor(num_classes=num_classes, **kwargs)
