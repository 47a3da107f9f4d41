"""Layers shaped for fast compilation on every backend.

XLA's CPU convolutions run at a few percent of the machine's matmul peak, and
their gradients get slower per image as the batch grows. A convolution written
as "gather the k*k shifted views, then one matmul" (im2col) is the same math
and gives XLA a dot it runs near peak, forward and backward. Parameters have the
same names, shapes (HWIO kernel) and initializers as `flax.linen.Conv`, so
checkpoints are interchangeable. `impl="xla"` selects `lax.conv` instead, which
is the better choice on GPU/TPU; `impl="auto"` (the default) picks by backend.

`dtype=bfloat16` means different things on the two forms, each the fast one for
its hardware. `impl="xla"` (accelerators): activations and matmuls in bfloat16.
`impl="im2col"` (CPU): only the matmul operands are rounded to bfloat16, the
products are accumulated and returned in float32, and everything else stays
float32. That is the form AMX units run 3-5x faster than float32 here, while
XLA's CPU elementwise kernels are slow on bfloat16 (its f32->bf16 `convert`
runs ~4x slower than the bit arithmetic in `to_bfloat16`).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn


IMPLS = ("auto", "im2col", "xla")


def resolve_impl(impl: str) -> str:
  """The convolution form to run: "auto" is "im2col" on CPU (XLA:CPU's own
  convolutions are slow) and "xla" on GPU/TPU; "im2col" and "xla" stay as given."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return impl


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
  impl: str = "auto"  # or "im2col", "xla"
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    sh, sw = self.strides
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, channels, self.features), jnp.float32)
    impl = resolve_impl(self.impl)
    if impl == "xla":
      kernel, x = kernel.astype(self.dtype), x.astype(self.dtype)
    if self.padding == "SAME":
      pads = [_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw)]
    elif self.padding == "VALID":
      pads = [(0, 0), (0, 0)]
    else:
      raise ValueError(f"padding must be 'SAME' or 'VALID', got {self.padding!r}")
    if impl == "xla":
      y = jax.lax.conv_general_dilated(x, kernel, (sh, sw), pads,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = _im2col_conv(x, kernel, (sh, sw), pads, self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(y.dtype)
    return y


def to_bfloat16(x):
  """float32 -> bfloat16, rounding to nearest even: bit-identical to `astype` (NaN stays
  NaN), in integer ops that XLA's CPU backend vectorizes."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
  rounded = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC0), rounded)
  return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


@jax.custom_vjp
def _bfloat16_matmul(x, w):
  return _bfloat16_matmul_fwd(x, w)[0]


def _bfloat16_matmul_fwd(x, w):
  x16, w16 = to_bfloat16(x), to_bfloat16(w)
  return jnp.matmul(x16, w16, preferred_element_type=jnp.float32), (x16, w16)


def _bfloat16_matmul_bwd(residuals, grad):
  # Both gradient products on bfloat16 operands too, accumulated in float32.
  x16, w16 = residuals
  grad16 = to_bfloat16(grad)
  grad_x = jnp.matmul(grad16, w16.T, preferred_element_type=jnp.float32)
  grad_w = jnp.matmul(x16.reshape(-1, x16.shape[-1]).T, grad16.reshape(-1, grad16.shape[-1]),
                      preferred_element_type=jnp.float32)
  return grad_x, grad_w


_bfloat16_matmul.defvjp(_bfloat16_matmul_fwd, _bfloat16_matmul_bwd)


def matmul(x, w, dtype=jnp.float32):
  """x @ w (x's last axis against w's first) with operands rounded to `dtype`
  (float32 or bfloat16), accumulated and returned in float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return x @ w
  if jnp.dtype(dtype) != jnp.bfloat16:
    raise ValueError(f"matmul dtype must be float32 or bfloat16, got {dtype}")
  return _bfloat16_matmul(x.astype(jnp.float32), w.astype(jnp.float32))


def dense(features: int, dtype=jnp.float32, impl: str = "auto", **kwargs) -> nn.Dense:
  """`nn.Dense` whose compute dtype means what `Conv`'s does for the same `impl`:
  "xla", activations and matmul in `dtype`; "im2col" (CPU), only the matmul operands
  (`matmul(..., dtype)`). Same parameters either way."""
  if resolve_impl(impl) == "xla":
    return nn.Dense(features, dtype=dtype, **kwargs)

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type  # float32 accumulation regardless
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
      raise ValueError(f"dense: unsupported dimension numbers {dimension_numbers}")
    return matmul(lhs, rhs, dtype)

  return nn.Dense(features, dot_general=dot_general, **kwargs)


def _im2col_conv(x, kernel, strides, pads, dtype=jnp.float32):
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
  return matmul(views, kernel.reshape(kh * kw * channels, features), dtype)


@jax.custom_vjp
def max_of_four(a, b, c, d):
  """Elementwise max of four arrays (a 2x2 pool's window, in row-major order). Its
  gradient goes to the first maximal input only, as XLA's max-pool gradient (and so
  `nn.max_pool`'s, Keras's, PyTorch's) does; `jnp.maximum` would split ties evenly."""
  return _max_of_four_fwd(a, b, c, d)[0]


def _max_of_four_fwd(a, b, c, d):
  ab, cd = jnp.maximum(a, b), jnp.maximum(c, d)
  first = jnp.where(ab >= cd, jnp.where(a >= b, 0, 1), jnp.where(c >= d, 2, 3))
  return jnp.maximum(ab, cd), first.astype(jnp.int8)


def _max_of_four_bwd(first, grad):
  return tuple(jnp.where(first == k, grad, jnp.zeros((), grad.dtype)) for k in range(4))


max_of_four.defvjp(_max_of_four_fwd, _max_of_four_bwd)


def max_pool_2x2(x):
  """2x2 max-pool, stride 2, VALID (odd edges dropped), as elementwise maxima.

  Same values and gradient as `nn.max_pool(x, (2, 2), (2, 2))`; XLA's CPU backend
  runs this form's gradient (selects) far faster than its select-and-scatter.
  """
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return max_of_four(x[:, 0:h:2, 0:w:2], x[:, 0:h:2, 1:w:2], x[:, 1:h:2, 0:w:2],
                     x[:, 1:h:2, 1:w:2])


class ConvReluPool(nn.Module):
  """Conv(3x3-style, VALID) -> ReLU -> 2x2 max-pool, computed only where the pool looks.

  Same parameters and outputs as `Conv(padding="VALID")`, `relu`, `max_pool_2x2`, in
  a form XLA's CPU backend runs far faster: the convolution is evaluated separately
  at the four pooling phases (rows 2i+a, columns 2j+b), so the pool is an elementwise
  max of the four and its gradient a plain select; outputs the pool would drop (an odd
  last row or column) are never computed. relu(max) == max(relu), so ReLU runs on the
  pooled values only.

  Layout, measured on XLA:CPU: the input is first split by row and column parity (one
  transpose, so a fused producer such as the previous layer's pool runs once, not once
  per window); every window is then a plain slice, and all four phases' patches are
  one concatenate along features, [N, out_h, out_w, 4 * kh * kw * C], which reshapes
  for free to the matmul's rows (n, i, j, phase). Phase-major rows cost two more
  copies and put the pool's four operands a whole phase apart.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    n, h, w = x.shape[:3]
    out_h, out_w = (h - kh + 1) // 2, (w - kw + 1) // 2
    # by_parity[r % 2, c % 2, :, r // 2, c // 2] == x[:, r, c]
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    by_parity = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, channels).transpose(2, 4, 0, 1, 3, 5)
    patches = jnp.concatenate([
        by_parity[(a + i) % 2, (b + j) % 2, :, (a + i) // 2:(a + i) // 2 + out_h,
                  (b + j) // 2:(b + j) // 2 + out_w]
        for a in (0, 1) for b in (0, 1) for i in range(kh) for j in range(kw)], axis=-1)
    y = matmul(patches.reshape(-1, kh * kw * channels), kernel.reshape(-1, self.features), self.dtype)
    y = y.reshape(n, out_h, out_w, 4, self.features)
    # Elementwise maxima, not a reduction: XLA's CPU reductions (and the tie counting in
    # their gradient) are many times slower than selects.
    return nn.relu(max_of_four(*(y[:, :, :, phase] for phase in range(4))) + bias)
