"""ResNets with BatchNorm: CIFAR-style (resnet8/14/20/32/56) and ImageNet-style (resnet18/34/50).

CIFAR-style (He et al. 2016, section 4.2): a 3x3 stem, three stages of n basic
blocks at `width`, 2*`width`, 4*`width` channels (depth 6n+2), global average
pool. ImageNet-style: a 7x7/2 stem and 3x3/2 max-pool (`stem="cifar"` swaps in a
3x3/1 stem for small inputs), four stages of basic (18, 34) or bottleneck (50)
blocks. Shortcuts that change shape are 1x1 convolutions with BatchNorm.

BatchNorm statistics live in the `batch_stats` collection, which the train step
threads through `TrainState.model_state`; `train=False` uses the running
averages. `bn_sync` says whose statistics a training step normalizes with:
  * "global" (the default): the whole batch's. Under jit on a data-sharded batch the
    batch mean is a global mean, so XLA all-reduces every BatchNorm's statistics over
    all devices (forward and backward: ~100 small all-reduces per ResNet-50 step);
  * "local": each device's own rows (the references' per-device BatchNorm, as under
    pmap without an axis name): no all-reduce on the step's critical path. The running
    averages are the devices' statistics averaged (one combinable all-reduce), so the
    state stays replicated, as the references' synchronized batch_stats.
Both use the same variables, so a checkpoint serves either.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import layers
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


BN_SYNCS = ("global", "local")


class BatchNorm(nn.Module):
  """BatchNorm over groups of the batch: group g holds rows g*N/groups ... (g+1)*N/groups - 1,
  device g's share of a data-sharded batch (research/mesh.py), and is normalized with its
  own statistics. flax's nn.BatchNorm's variables and arithmetic (E[x^2] - E[x]^2 in
  float32); named like it, so both give one parameter tree. The running averages move
  towards the groups' mean statistics."""

  groups: int
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
      grouped = x
    else:
      grouped = x.reshape(self.groups, x.shape[0] // self.groups, *x.shape[1:])
      values = grouped.astype(jnp.float32)
      axes = tuple(range(1, grouped.ndim - 1))  # each group's rows and positions
      mean = values.mean(axes, keepdims=True)
      var = jnp.maximum(0.0, (values * values).mean(axes, keepdims=True) - mean * mean)
      if not self.is_initializing():
        decay = lambda old, new: self.momentum * old + (1 - self.momentum) * new.reshape(
            -1, features).mean(0)
        running_mean.value = decay(running_mean.value, mean)
        running_var.value = decay(running_var.value, var)
    y = (grouped - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


def layer_set(module, train: bool):
  """(conv, norm, dense) constructors for `module`'s conv_impl, dtype and bn_sync (also
  used by wide_resnet.py): with im2col convolutions (CPU) only matmul operands take
  `dtype` and activations stay float32 (see layers.py)."""
  impl = layers.resolve_impl(module.conv_impl)
  conv = functools.partial(Conv, use_bias=False, impl=impl, dtype=module.dtype,
                           kernel_init=_CONV_INIT)
  activations = module.dtype if impl == "xla" else jnp.float32
  if module.bn_sync not in BN_SYNCS:
    raise ValueError(f"bn_sync must be one of {BN_SYNCS}, got {module.bn_sync!r}")
  batch_norm = nn.BatchNorm
  if module.bn_sync == "local" and train:  # a group per device: the batch spans them all
    batch_norm = functools.partial(BatchNorm, groups=jax.device_count())
  norm = functools.partial(batch_norm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=activations)
  dense = functools.partial(layers.dense, dtype=module.dtype, impl=impl)
  return conv, norm, dense


def _stem(x, kind: str, width: int, conv, norm):
  """imagenet: 7x7/2 conv + 3x3/2 max-pool (1/4 resolution); cifar: 3x3/1 conv (full
  resolution); pool: 3x3/1 conv + 2x2 max-pool (1/2 resolution)."""
  if kind == "imagenet":
    x = nn.relu(norm()(conv(width, (7, 7), (2, 2))(x)))
    return nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
  x = nn.relu(norm()(conv(width, (3, 3))(x)))
  if kind == "cifar":
    return x
  if kind == "pool":
    if x.shape[1] % 2 or x.shape[2] % 2:
      return nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    return layers.max_pool_2x2(x)  # the same values; a faster gradient on CPU
  raise ValueError(f"stem must be 'imagenet', 'cifar' or 'pool', got {kind!r}")


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for small images; resnet8/14/20/32/56 are n = 1/2/3/5/9.

  `stem="pool"` adds a 2x2 max-pool after the stem convolution, so the stages run
  at half the resolution (14, 7, 4 on 28x28 inputs): a quarter of the work per
  channel, spent on wider stages instead (see configs/fashion_mnist_resnet.py).
  """

  num_classes: int
  blocks_per_stage: int = 3
  width: int = 16
  stem: str = "cifar"  # or "pool"
  conv_impl: str = "auto"  # "im2col" on CPU, "xla" on GPU/TPU
  dtype: jnp.dtype = jnp.float32
  bn_sync: str = "global"  # or "local": each device's own BatchNorm statistics

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm, dense = layer_set(self, train)
    x = _stem(x, self.stem, self.width, conv, norm)
    for stage in range(3):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, conv, norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    return dense(self.num_classes)(x).astype(jnp.float32)


class ImageNetResNet(nn.Module):
  """ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks) of He et al. 2015."""

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  width: int = 64
  stem: str = "imagenet"  # or "cifar" / "pool" for inputs of ~32 pixels (see _stem)
  conv_impl: str = "auto"  # "im2col" on CPU, "xla" on GPU/TPU
  dtype: jnp.dtype = jnp.float32
  bn_sync: str = "global"  # or "local": each device's own BatchNorm statistics

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm, dense = layer_set(self, train)
    x = _stem(x, self.stem, self.width, conv, norm)
    block = BottleneckBlock if self.bottleneck else BasicBlock
    for stage, size in enumerate(self.stage_sizes):
      for index in range(size):
        strides = 2 if stage > 0 and index == 0 else 1
        x = block(self.width * 2**stage, strides, conv, norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    return dense(self.num_classes)(x).astype(jnp.float32)


resnet8 = functools.partial(CifarResNet, blocks_per_stage=1)
resnet14 = functools.partial(CifarResNet, blocks_per_stage=2)
resnet20 = functools.partial(CifarResNet, blocks_per_stage=3)
resnet32 = functools.partial(CifarResNet, blocks_per_stage=5)
resnet56 = functools.partial(CifarResNet, blocks_per_stage=9)
resnet18 = functools.partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2))
resnet34 = functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3))
resnet50 = functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True)
