"""Wide ResNet WRN-depth-width (Zagoruyko & Komodakis 2016), default WRN-16-4.

Pre-activation blocks (BN -> ReLU -> conv), three stages of (depth - 4) / 6
blocks at 16k, 32k, 64k channels, optional dropout between the two convolutions
of a block. BatchNorm statistics behave as in `resnet.py` (`bn_sync` included).
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from research.models.resnet import layer_set


class WideBlock(nn.Module):
  features: int
  strides: int
  dropout_rate: float
  conv: functools.partial
  norm: functools.partial

  @nn.compact
  def __call__(self, x, train: bool):
    activated = nn.relu(self.norm()(x))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(activated)
    y = nn.relu(self.norm()(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = self.conv(self.features, (3, 3))(y)
    if x.shape != y.shape:
      x = self.conv(self.features, (1, 1), (self.strides, self.strides))(activated)
    return x + y


class WideResNet(nn.Module):
  num_classes: int
  depth: int = 16
  width: int = 4
  dropout_rate: float = 0.0
  conv_impl: str = "auto"  # "im2col" on CPU, "xla" on GPU/TPU
  dtype: jnp.dtype = jnp.float32
  bn_sync: str = "global"  # or "local": each device's own BatchNorm statistics (resnet.py)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"wide_resnet depth must be 6n+4 (10, 16, 22, 28, ...), got {self.depth}")
    conv, norm, dense = layer_set(self, train)
    x = conv(16, (3, 3))(x)
    for stage in range(3):
      for block in range((self.depth - 4) // 6):
        strides = 2 if stage > 0 and block == 0 else 1
        x = WideBlock(16 * self.width * 2**stage, strides, self.dropout_rate, conv, norm)(x, train)
    x = nn.relu(norm()(x))
    x = jnp.mean(x, axis=(1, 2))
    return dense(self.num_classes)(x).astype(jnp.float32)
