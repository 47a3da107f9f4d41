"""ResNets with BatchNorm: CIFAR-style (resnet8/14/20/32/56) and ImageNet-style (resnet18/34/50).

CIFAR-style (He et al. 2016, section 4.2): a 3x3 stem, three stages of n basic
blocks at `width`, 2*`width`, 4*`width` channels (depth 6n+2), global average
pool. ImageNet-style: a 7x7/2 stem and 3x3/2 max-pool (`stem="cifar"` swaps in a
3x3/1 stem for small inputs), four stages of basic (18, 34) or bottleneck (50)
blocks. Shortcuts that change shape are 1x1 convolutions with BatchNorm.

BatchNorm statistics live in the `batch_stats` collection, which the train step
threads through `TrainState.model_state`; `train=False` uses the running
averages. Under jit on a data-sharded batch the batch mean is a global mean, so
the statistics are averaged over all devices without extra code.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from research.models.layers import Conv

# He-normal (fan_out), as in the reference ResNets.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  features: int
  strides: int
  conv: functools.partial
  norm: functools.partial

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)  # each block starts as the identity
    if x.shape != y.shape:
      x = self.conv(self.features, (1, 1), (self.strides, self.strides))(x)
      x = self.norm()(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  features: int
  strides: int
  conv: functools.partial
  norm: functools.partial

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.features, (3, 3), (self.strides, self.strides))(y)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features * 4, (1, 1))(y))
    if x.shape != y.shape:
      x = self.norm()(self.conv(self.features * 4, (1, 1), (self.strides, self.strides))(x))
    return nn.relu(x + y)


def _layers(module, train: bool):
  conv = functools.partial(Conv, use_bias=False, impl=module.conv_impl, dtype=module.dtype,
                           kernel_init=_CONV_INIT)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=module.dtype)
  return conv, norm


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images; resnet8/14/20/32/56 are n = 1/2/3/5/9."""

  num_classes: int
  blocks_per_stage: int = 3
  width: int = 16
  conv_impl: str = "im2col"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _layers(self, train)
    x = nn.relu(norm()(conv(self.width, (3, 3))(x)))
    for stage in range(3):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, conv, norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class ImageNetResNet(nn.Module):
  """ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks) of He et al. 2015."""

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  width: int = 64
  stem: str = "imagenet"  # or "cifar": 3x3/1 conv, no max-pool, for inputs of ~32 pixels
  conv_impl: str = "im2col"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _layers(self, train)
    if self.stem == "imagenet":
      x = nn.relu(norm()(conv(self.width, (7, 7), (2, 2))(x)))
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    elif self.stem == "cifar":
      x = nn.relu(norm()(conv(self.width, (3, 3))(x)))
    else:
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
    block = BottleneckBlock if self.bottleneck else BasicBlock
    for stage, size in enumerate(self.stage_sizes):
      for index in range(size):
        strides = 2 if stage > 0 and index == 0 else 1
        x = block(self.width * 2**stage, strides, conv, norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


resnet8 = functools.partial(CifarResNet, blocks_per_stage=1)
resnet14 = functools.partial(CifarResNet, blocks_per_stage=2)
resnet20 = functools.partial(CifarResNet, blocks_per_stage=3)
resnet32 = functools.partial(CifarResNet, blocks_per_stage=5)
resnet56 = functools.partial(CifarResNet, blocks_per_stage=9)
resnet18 = functools.partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2))
resnet34 = functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3))
resnet50 = functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True)
