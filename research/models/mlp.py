"""A plain multilayer perceptron: flatten -> [Dense -> ReLU -> Dropout]* -> Dense."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from research import knobs
from research.models.layers import DTYPE_KNOB

# The knobs of this model (defaults: the fields below), for the registry in models/__init__.py.
KNOBS = {
    "hidden_features": knobs.ints(knobs.OWN, "units of each hidden layer", low=1, high=2**20),
    "dropout_rate": knobs.number(knobs.OWN, "dropout probability", **knobs.FRACTION),
    **DTYPE_KNOB,
}


class MLP(nn.Module):
  num_classes: int
  hidden_features: Sequence[int] = (512, 512)
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for features in self.hidden_features:
      x = nn.relu(nn.Dense(features, dtype=self.dtype)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
