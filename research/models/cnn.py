"""The seed CNN of the classic Keras tutorial, and its width/depth knobs.

Default: Conv(32,3x3,VALID,relu) -> MaxPool2 -> Conv(64,3x3,VALID,relu) -> MaxPool2
-> Flatten -> Dense(64,relu) -> Dense(classes). Keras's initializers: Glorot-uniform
kernels, zero biases. 121,930 parameters on 28x28x1 with 10 classes.
"""

import functools
from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

from research import knobs
from research.models.layers import (CONV_KNOBS, Conv, ConvReluPool, dense, max_pool_2x2,
                                    resolve_impl)

# The knobs of this model (defaults: the fields below), for the registry in models/__init__.py.
KNOBS = {
    "conv_features": knobs.ints(knobs.OWN, "channels of each conv layer", low=1, high=65536),
    "dense_features": knobs.integer(knobs.OWN, "units of the hidden dense layer", low=1,
                                    high=2**20),
    **CONV_KNOBS,
}


class CNN(nn.Module):
  num_classes: int
  conv_features: Sequence[int] = (32, 64)
  dense_features: int = 64
  conv_impl: str = "auto"  # "im2col" on CPU, "xla" on GPU/TPU (layers.resolve_impl)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout or normalization in this model
    impl = resolve_impl(self.conv_impl)
    for i, features in enumerate(self.conv_features):
      name = f"Conv_{i}"  # the names nn.Conv would get: checkpoints fit either form
      if impl == "im2col":  # the fast CPU form of the same layers
        x = ConvReluPool(features, dtype=self.dtype, name=name)(x)
      else:
        x = Conv(features, (3, 3), padding="VALID", impl=impl, dtype=self.dtype,
                 name=name)(x)
        x = max_pool_2x2(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    make_dense = functools.partial(dense, dtype=self.dtype, impl=impl,
                                   kernel_init=nn.initializers.glorot_uniform())
    x = nn.relu(make_dense(self.dense_features)(x))
    return make_dense(self.num_classes)(x).astype(jnp.float32)
