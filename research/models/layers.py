"""Layers shaped for fast compilation on every backend.

XLA's CPU convolutions run at a few percent of the machine's matmul peak, and
their gradients get slower per image as the batch grows. A convolution written
as "gather the k*k shifted views, then one matmul" (im2col) is the same math
and gives XLA a dot it runs near peak, forward and backward. Parameters have the
same names, shapes (HWIO kernel) and initializers as `flax.linen.Conv`, so
checkpoints are interchangeable. `impl="xla"` selects `lax.conv` instead, which
is the better choice on GPU/TPU.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class Conv(nn.Module):
  """2-D convolution, NHWC, HWIO kernel; `padding` is 'SAME' or 'VALID'."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  impl: str = "im2col"  # or "xla"
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    sh, sw = self.strides
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, channels, self.features), jnp.float32)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if self.padding == "SAME":
      pads = [_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw)]
    elif self.padding == "VALID":
      pads = [(0, 0), (0, 0)]
    else:
      raise ValueError(f"padding must be 'SAME' or 'VALID', got {self.padding!r}")
    if self.impl == "xla":
      y = jax.lax.conv_general_dilated(x, kernel, (sh, sw), pads,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif self.impl == "im2col":
      y = _im2col_conv(x, kernel, (sh, sw), pads)
    else:
      raise ValueError(f"conv impl must be 'im2col' or 'xla', got {self.impl!r}")
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


def _im2col_conv(x, kernel, strides, pads):
  kh, kw, channels, features = kernel.shape
  sh, sw = strides
  if any(p for pair in pads for p in pair):
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  height = (x.shape[1] - kh) // sh + 1
  width = (x.shape[2] - kw) // sw + 1
  if kh == kw == 1:
    views = x[:, ::sh, ::sw, :][:, :height, :width]
  else:
    # Feature order (kh, kw, c) matches kernel.reshape(kh * kw * c, features).
    views = jnp.concatenate([
        x[:, i:i + (height - 1) * sh + 1:sh, j:j + (width - 1) * sw + 1:sw, :]
        for i in range(kh) for j in range(kw)], axis=-1)
  return views @ kernel.reshape(kh * kw * channels, features)


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, VALID (odd edges dropped), as reshape + max.

  Same values as `nn.max_pool(x, (2, 2), (2, 2))`; XLA's CPU backend runs the
  gradient of this form far faster than its select-and-scatter.
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
