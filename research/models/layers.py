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
float32. That is the form AMX units run 2-3x faster than float32 here, while
XLA's CPU elementwise kernels are slow on bfloat16 (its f32->bf16 `convert`
runs ~4x slower than the bit arithmetic in `to_bfloat16`). A layer whose input is
narrower than MIN_BFLOAT16_CONTRACTION stays float32.

The bfloat16 products, the seed CNN's conv+pool (`ConvReluPool`) and the 2x2
max-pool define their gradients (`jax.custom_vjp`), written in the dot layouts
XLA:CPU runs fastest (`_gradients`). They support reverse mode, including
reverse-over-reverse (Hessian-vector products, in float32: bfloat16 roundings have
no derivative), but not forward mode (`jax.jvp`); float32 `Conv` and `dense` use
plain JAX and support both.
"""

import functools
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from research import backend, knobs

IMPLS = ("auto", "im2col", "xla")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Knobs that models built from these layers share (their declarations, for the registry).
DTYPE_KNOB = {"dtype": knobs.choice(knobs.OWN, "compute dtype (parameters stay float32)",
                                    DTYPES)}
CONV_KNOBS = {"conv_impl": knobs.choice(knobs.OWN, "convolution form (auto picks per backend)",
                                        IMPLS), **DTYPE_KNOB}


def resolve_impl(impl: str) -> str:
  """The convolution form to run: "auto" is "im2col" on CPU (XLA:CPU's own
  convolutions are slow) and "xla" on GPU/TPU; "im2col" and "xla" stay as given."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return backend.current().conv_impl
  return impl


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pairs(value, name: str) -> tuple[int, int]:
  """An int or a pair of ints, as flax.linen.Conv takes strides and dilations."""
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2:
    raise ValueError(f"{name} must be an int or a pair of ints (2-D), got {value!r}")
  return pair


def _pads(padding, x_shape, kernel_size, strides, dilation) -> list[tuple[int, int]]:
  """flax.linen.Conv's padding forms -> explicit (low, high) pads of H and W: 'SAME',
  'VALID', 'CIRCULAR' is not supported; an int n (n on every side), or ((lo, hi), (lo, hi))."""
  effective = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  if padding == "SAME":
    return [_same_padding(x_shape[1 + axis], effective[axis], strides[axis]) for axis in (0, 1)]
  if padding == "VALID":
    return [(0, 0), (0, 0)]
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  if not isinstance(padding, str) and len(padding) == 2:
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((top, bottom), (left, right)), "
                   f"got {padding!r}")


class Conv(nn.Module):
  """2-D convolution, NHWC, HWIO kernel, taking what `flax.linen.Conv` takes for images:
  `strides`, `padding` ('SAME', 'VALID', an int or explicit pairs), `kernel_dilation` and
  `feature_group_count` (grouped and depthwise convolutions), with the same parameters.

  The fast CPU form (im2col: shifted views, one matmul) covers plain convolutions with
  any strides and padding; a dilated or grouped convolution runs as `lax.conv` on every
  backend (XLA:CPU's own grouped convolutions are fast: their work is small).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = (1, 1)
  padding: str | int | Sequence = "SAME"
  kernel_dilation: int | Sequence[int] = (1, 1)
  feature_group_count: int = 1
  use_bias: bool = True
  impl: str = "auto"  # or "im2col", "xla"
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    strides = _pairs(self.strides, "strides")
    dilation = _pairs(self.kernel_dilation, "kernel_dilation")
    channels, groups = x.shape[-1], self.feature_group_count
    if channels % groups or self.features % groups:
      raise ValueError(f"feature_group_count={groups} must divide the input channels "
                       f"({channels}) and the features ({self.features})")
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, channels // groups, self.features), jnp.float32)
    impl = form(self.impl, dilation, groups)
    if impl == "xla":
      kernel, x = kernel.astype(self.dtype), x.astype(self.dtype)
    pads = _pads(self.padding, x.shape, (kh, kw), strides, dilation)
    if impl == "xla":
      y = jax.lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=groups)
    else:
      y = _im2col_conv(x, kernel, strides, pads, self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = _add_bias(y, bias, y.dtype)
    return y


def form(impl: str, dilation=(1, 1), groups: int = 1) -> str:
  """The form a convolution runs in: `resolve_impl(impl)`, except that dilated and grouped
  convolutions, which the im2col form does not cover, are always "xla"."""
  resolved = resolve_impl(impl)
  if resolved == "im2col" and (tuple(dilation) != (1, 1) or groups != 1):
    return "xla"
  return resolved


def _add_bias(y, bias, dtype):
  """y + bias in float32, returned in `dtype`: a bfloat16 add would round the (small)
  bias against the (large) activation, and its gradient, a sum over every position of
  the batch, would be accumulated in bfloat16."""
  return (y.astype(jnp.float32) + bias).astype(dtype)


def _bfloat16_bits(x):
  """float32 -> the uint16 bits of its bfloat16 rounding (to nearest even; NaN stays NaN)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
  rounded = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC0), rounded)
  return rounded.astype(jnp.uint16)


def to_bfloat16(x):
  """float32 -> bfloat16, rounding to nearest even: bit-identical to `astype` (NaN stays
  NaN), in integer ops that XLA's CPU backend vectorizes."""
  return jax.lax.bitcast_convert_type(_bfloat16_bits(x), jnp.bfloat16)


def _encode(x, rounded: bool):
  """What patches are built on: x's bfloat16 bits (uint16, which XLA:CPU moves without
  converting) when operands are `rounded`, else x itself."""
  return _bfloat16_bits(x) if rounded else x


def _decode(encoded, rounded: bool):
  return jax.lax.bitcast_convert_type(encoded, jnp.bfloat16) if rounded else encoded


def _operand(x, rounded: bool):
  return to_bfloat16(x) if rounded else x


def _mm(a, b, contract_b=0):
  """a @ b (a's last axis against b's axis `contract_b`), accumulated in float32."""
  dims = (((a.ndim - 1,), (contract_b,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _gradients(encoded, w, grad, grad_transposed, patches_transposed, rounded: bool,
               eigen: bool = True):
  """grad @ w.T and patches.T @ grad, on operands rounded to bfloat16 if `rounded`.

  XLA:CPU hands a dot to YNNPACK (AMX for bfloat16) only when the left operand's
  contracting axis is its last; otherwise Eigen runs it in float32, 1.3x (float32)
  to 6x (bfloat16) slower. The weight gradient contracts over the rows M, so one of
  patches [M, K] and grad [M, F] must exist transposed: the smaller job is done,
  through `grad_transposed()` [F, M] or `patches_transposed()` [K, M].

  Unrounded (float32), Eigen's transposed-operand dot beats YNNPACK's for these shapes
  and needs no transposed operand; with `eigen=False` YNNPACK runs it all the same: in a
  bfloat16 step every other product runs on YNNPACK's threads, and one Eigen product
  there cost more in thread hand-offs (about 50 us a step at batch 32) than its faster
  kernel saved.
  """
  (m, k), f = encoded.shape, w.shape[1]
  grad_p = _mm(grad, _operand(w, rounded), contract_b=1)
  if not rounded and eigen:
    return grad_p, jax.lax.dot_general(encoded, grad, (((0,), (0,)), ((), ())))
  if m * f + k * f < m * k:
    # The barrier keeps XLA from folding the final (small) transpose into the dot.
    grad_w = jax.lax.optimization_barrier(_mm(grad_transposed(), _decode(encoded, rounded))).T
  else:
    grad_w = _mm(patches_transposed(), grad)
  return grad_p, grad_w


def _patch_product(x, w, patches, rounded: bool):
  """patches(x) @ w in float32 -> (product [M, F], the encoded patches [M, K]). Rounds
  x, not its patches (k*k times larger): the patches are built on its bits."""
  encoded = patches(_encode(x, rounded)).reshape(-1, w.shape[0])
  return _mm(_decode(encoded, rounded), _operand(w, rounded)), encoded


def _patches_transpose(patches, x_shape, grad_p):
  """The gradient of x from that of patches(x): patches is linear."""
  zeros = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  grad_x, = jax.linear_transpose(patches, zeros)(
      grad_p.reshape(jax.eval_shape(patches, zeros).shape))
  return grad_x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bfloat16_patch_matmul(x, w, patches):
  return _bfloat16_patch_matmul_fwd(x, w, patches)[0]


def _bfloat16_patch_matmul_fwd(x, w, patches):
  y, encoded = _patch_product(x, w, patches, rounded=True)
  return y, (x, encoded, w)


def _bfloat16_patch_matmul_bwd(patches, residuals, grad):
  x, encoded, w = residuals
  grad = grad.reshape(-1, w.shape[1])
  grad_p, grad_w = _gradients(
      encoded, w, to_bfloat16(grad), lambda: to_bfloat16(grad.T),
      lambda: to_bfloat16(patches(x).reshape(encoded.shape).T), rounded=True)
  return _patches_transpose(patches, x.shape, grad_p), grad_w


_bfloat16_patch_matmul.defvjp(_bfloat16_patch_matmul_fwd, _bfloat16_patch_matmul_bwd)


# A layer whose input (its forward product's contraction) is narrower than this stays
# float32 under dtype=bfloat16: AMX tiles are 32 bfloat16 values deep, and the
# roundings cost more than they save (the seed CNN's first layer, 9 wide, made its step
# 9% slower in bfloat16).
MIN_BFLOAT16_CONTRACTION = 32


def _rounds_to_bfloat16(dtype, contraction: int) -> bool:
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"matmul dtype must be float32 or bfloat16, got {dtype}")
  return jnp.dtype(dtype) == jnp.bfloat16 and contraction >= MIN_BFLOAT16_CONTRACTION


def patch_matmul(x, w, patches=lambda x: x, dtype=jnp.float32):
  """patches(x) @ w (the patches' last axis against w's first), accumulated and returned
  in float32. `patches` is linear (slices, pads, concatenates, reshapes): with
  `dtype=bfloat16`, x is rounded once, before it; x's gradient is patches' transpose."""
  if not _rounds_to_bfloat16(dtype, w.shape[0]):
    return patches(x) @ w  # plain JAX: every transformation, forward mode included
  shape = jax.eval_shape(patches, jax.ShapeDtypeStruct(x.shape, jnp.float32)).shape
  y = _bfloat16_patch_matmul(x.astype(jnp.float32), w.astype(jnp.float32), patches)
  return y.reshape(*shape[:-1], w.shape[1])


def matmul(x, w, dtype=jnp.float32):
  """x @ w (x's last axis against w's first) with operands rounded to `dtype`
  (float32 or bfloat16; see MIN_BFLOAT16_CONTRACTION), accumulated and returned in
  float32."""
  return patch_matmul(x, w, dtype=dtype)


class Dense(nn.Module):
  """`nn.Dense`'s parameters (kernel [in, features], bias), names and default
  initializers, with the compute dtype meaning what `Conv`'s does for the same `impl`:
  "xla", activations and matmul in `dtype`; "im2col" (CPU), only the matmul operands
  (`matmul(..., dtype)`), float32 out. The bias is added in float32 either way."""

  features: int
  dtype: jnp.dtype = jnp.float32
  impl: str = "auto"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    if resolve_impl(self.impl) == "xla":
      y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
      return _add_bias(y, bias, self.dtype)
    return matmul(x, kernel, self.dtype) + bias


def dense(features: int, dtype=jnp.float32, impl: str = "auto", **kwargs) -> Dense:
  """A `Dense` layer (same parameters as `nn.Dense`; see `Dense` for `dtype`)."""
  return Dense(features, dtype=dtype, impl=impl, **kwargs)


def _im2col_conv(x, kernel, strides, pads, dtype=jnp.float32):
  kh, kw, channels, features = kernel.shape
  sh, sw = strides
  height = (x.shape[1] + sum(pads[0]) - kh) // sh + 1
  width = (x.shape[2] + sum(pads[1]) - kw) // sw + 1

  def views(x):
    if any(p for pair in pads for p in pair):
      x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    if kh == kw == 1:
      return x[:, ::sh, ::sw, :][:, :height, :width]
    # Feature order (kh, kw, c) matches kernel.reshape(kh * kw * c, features).
    return jnp.concatenate([
        x[:, i:i + (height - 1) * sh + 1:sh, j:j + (width - 1) * sw + 1:sw, :]
        for i in range(kh) for j in range(kw)], axis=-1)

  return patch_matmul(x, kernel.reshape(kh * kw * channels, features), views, dtype)


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


def _phase_gradient(first, grad, rounded: bool, transposed: bool = False):
  """The gradient of the four pool phases: `grad` where `first` names the phase, else
  0; rows (n, i, j, phase) by features, or its transpose, which is built from the 4x
  smaller pooled arrays rather than by transposing the result."""
  if transposed:
    first, grad = first.transpose(3, 0, 1, 2)[..., None], grad.transpose(3, 0, 1, 2)[..., None]
    out = jnp.where(first == jnp.arange(4, dtype=first.dtype), grad, jnp.zeros((), grad.dtype))
    return _operand(out.reshape(out.shape[0], -1), rounded)
  # Not a stack of `_max_of_four_bwd`'s four arrays: XLA:CPU runs that 10-15% slower.
  out = jnp.where(first[..., None, :] == jnp.arange(4, dtype=first.dtype)[:, None],
                  grad[..., None, :], jnp.zeros((), grad.dtype))
  return _operand(out.reshape(-1, out.shape[-1]), rounded)


def _pooled_hw(x_shape, kernel_size) -> tuple[int, int]:
  """Height and width after a VALID kh x kw convolution and a 2x2 pool (odd edges dropped)."""
  (kh, kw), (h, w) = kernel_size, x_shape[1:3]
  return (h - kh + 1) // 2, (w - kw + 1) // 2


def _phase_window(x, kernel_size):
  """window(a, b, i, j) -> [n, out_h, out_w, C]: x[:, 2r + a + i, 2s + b + j] at pooled
  row r and column s, for pool phase (a, b) and kernel tap (i, j).

  x is first split by row and column parity (one transpose, so a fused producer such as
  the previous layer's rounding runs once, not once per window); every window is then a
  plain slice."""
  n, h, w, channels = x.shape
  out_h, out_w = _pooled_hw(x.shape, kernel_size)
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  # by_parity[r % 2, c % 2, :, r // 2, c // 2] == x[:, r, c]
  by_parity = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, channels).transpose(2, 4, 0, 1, 3, 5)

  def window(a, b, i, j):
    return by_parity[(a + i) % 2, (b + j) % 2, :, (a + i) // 2:(a + i) // 2 + out_h,
                     (b + j) // 2:(b + j) // 2 + out_w]

  return window


def _phase_patches(x, kernel_size, form: str = "stacked"):
  """The matmul operand of a VALID convolution at the four 2x2-pool phases: rows
  (n, i, j, a, b) hold the kh x kw x C window at x[:, 2i + a:, 2j + b:], the kernel's
  (kh, kw, c) order; odd last rows and columns (the pool drops them) are skipped.

  The windows are `_phase_window`'s slices. Three forms, measured on XLA:CPU:
  - "stacked" nests stacks of kw, kh and 2 windows on non-minor axes, which XLA fuses
    into one loop writing the operand (it fuses no concatenate of more than 8 parts).
    The forward: 2-5% more images/s in bfloat16 than one 36-way concatenate, which XLA
    runs as 16 materialized windows, a copy and, for bfloat16, one more copy;
  - "concatenated" is that concatenate, whose transpose (the input gradient's col2im)
    XLA runs faster than the stacks';
  - "transposed" is the operand transposed, [kh * kw * C, rows], built as such: a
    transpose op would be folded into the dot that reads it.
  """
  kh, kw = kernel_size
  channels = x.shape[-1]
  window = _phase_window(x, kernel_size)

  def stack(parts, axis):
    return jnp.stack(list(parts), axis=axis)

  if form == "stacked":
    windows = stack((stack((stack((stack((window(a, b, i, j) for j in range(kw)), -2)
                                   for i in range(kh)), -3) for b in (0, 1)), -4)
                     for a in (0, 1)), -5)
  elif form == "concatenated":
    windows = jnp.concatenate([window(a, b, i, j) for a in (0, 1) for b in (0, 1)
                               for i in range(kh) for j in range(kw)], axis=-1)
  elif form == "transposed":
    windows = stack((stack((stack((stack((window(a, b, i, j) for b in (0, 1)), -1)
                                   for a in (0, 1)), -2) for j in range(kw)), 0)
                     for i in range(kh)), 0)  # [kh, kw, n, out_h, out_w, C, 2, 2]
    return jnp.moveaxis(windows, 5, 2).reshape(kh * kw * channels, -1)
  else:
    raise ValueError(f"form must be 'stacked', 'concatenated' or 'transposed', got {form!r}")
  return windows.reshape(-1, kh * kw * channels)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_and_first(y, axis: int):
  """The max over `axis` (at most 127 entries: the index is int8) and the index of its
  first maximal entry, as `jnp.max` and `jnp.argmax` give them (ties go to the first, as
  `max_of_four`'s gradient does; a NaN is the maximum), in one variadic reduce. XLA:CPU
  counts a reduce as expensive, so it computes both once and keeps them; the same maxima
  as elementwise ops would be recomputed from y inside every fusion that reads them (the
  gradient's selects, the next layer's rounding), each a pass over the 4x larger y."""
  def first_max(a, b):  # symmetric, so any reduction order gives the same answer
    (a_val, a_idx), (b_val, b_idx) = a, b
    a_wins = (a_val >= b_val) | jnp.isnan(a_val)
    b_wins = (b_val >= a_val) | jnp.isnan(b_val)
    take_a = a_wins & (~b_wins | (a_idx < b_idx))
    return jnp.where(take_a, a_val, b_val), jnp.where(take_a, a_idx, b_idx)

  index = jax.lax.broadcasted_iota(jnp.int8, y.shape, axis)
  return jax.lax.reduce((y, index), (jnp.array(-jnp.inf, y.dtype), jnp.int8(y.shape[axis])),
                        first_max, (axis,))


@_max_and_first.defjvp
def _max_and_first_jvp(axis, primals, tangents):
  # JAX has no derivative for a variadic reduce; the max's is the first maximal entry's.
  (y,), (y_dot,) = primals, tangents
  pooled, first = _max_and_first(y, axis)
  index = jax.lax.broadcasted_iota(jnp.int8, y.shape, axis)
  picked = jnp.sum(jnp.where(index == jnp.expand_dims(first, axis), y_dot, 0), axis)
  return (pooled, first), (picked, np.zeros(first.shape, jax.dtypes.float0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _phase_conv_max(x, w, kernel_size, dtype):
  """The max over the four pool phases of _phase_patches(x) @ w (rows (n, i, j, phase)),
  its operands rounded as `dtype` says (`_rounds_to_bfloat16`); a narrow, shallow w
  (`_is_direct`) as multiply-adds instead."""
  return _phase_conv_max_fwd(x, w, kernel_size, dtype)[0]


# A convolution at most this wide (kh * kw * C) and this deep (features) runs as plain
# multiply-adds (`_direct_phases`), not as a matmul: the seed CNN's first layer (3x3 on
# one channel, 32 features) spent more time writing and reading its 4x larger product,
# patches and phase gradient than multiplying. Measured in whole train steps (images/s):
# seed CNN at batch 32, bfloat16 18,300 against 16,200, float32 11,100 against 10,900;
# the speed run 18,600 against 17,000. Not beyond: 64 features (the speed run's `:long`)
# 7,970 against 8,600; 18 wide (two channels) or 25 (5x5), the layer alone 4-6x slower.
# Always float32 (MIN_BFLOAT16_CONTRACTION is larger).
MAX_DIRECT_CONTRACTION = 9
MAX_DIRECT_FEATURES = 32


def _is_direct(w) -> bool:
  return w.shape[0] <= MAX_DIRECT_CONTRACTION and w.shape[1] <= MAX_DIRECT_FEATURES


def _kernel_entries(kernel_size, channels) -> list[tuple[int, int, int]]:
  """(i, j, c) of every kernel entry, in the order of the kernel's rows (kh, kw, c)."""
  kh, kw = kernel_size
  return [(i, j, c) for i in range(kh) for j in range(kw) for c in range(channels)]


def _direct_phases(x, w, kernel_size):
  """_phase_patches(x) @ w as [n, out_h, out_w, 4 phases, F], written as kh * kw * C
  multiply-adds of x's windows, which XLA:CPU fuses with the pool's reduce into one
  loop: nothing 4x the pooled size is ever written."""
  window, entries = _phase_window(x, kernel_size), _kernel_entries(kernel_size, x.shape[-1])

  def phase(a, b):
    return functools.reduce(operator.add, [window(a, b, i, j)[..., c, None] * w[k]
                                           for k, (i, j, c) in enumerate(entries)])

  return jnp.stack([phase(a, b) for a in (0, 1) for b in (0, 1)], axis=3)


def _direct_weight_gradient(x, first, grad, kernel_size):
  """`_direct_phases`' weight gradient, [kh * kw * C, F]: for each kernel entry, x at the
  phase the pool picked (`first`) times `grad`, summed. XLA:CPU runs each as one loop
  that picks and one YNNPACK reduction; the matmul form's weight gradient writes and
  reads the 4x larger phase gradient and the patches instead."""
  window = _phase_window(x, kernel_size)

  def entry(i, j, c):
    w00, w01, w10, w11 = (window(a, b, i, j)[..., c, None] for a in (0, 1) for b in (0, 1))
    picked = jnp.where(first == 0, w00, jnp.where(first == 1, w01,
                                                  jnp.where(first == 2, w10, w11)))
    return jnp.sum(picked * grad, (0, 1, 2))

  return jnp.stack([entry(*e) for e in _kernel_entries(kernel_size, x.shape[-1])])


def _phase_conv_max_fwd(x, w, kernel_size, dtype):
  if _is_direct(w):
    pooled, first = _max_and_first(_direct_phases(x, w, kernel_size), axis=3)
    return pooled, (x, None, w, first)
  patches = functools.partial(_phase_patches, kernel_size=kernel_size)
  y, encoded = _patch_product(x, w, patches, _rounds_to_bfloat16(dtype, w.shape[0]))
  y = y.reshape(x.shape[0], *_pooled_hw(x.shape, kernel_size), 4, w.shape[1])
  pooled, first = _max_and_first(y, axis=3)
  return pooled, (x, encoded, w, first)


def _phase_conv_max_bwd(kernel_size, dtype, residuals, grad):
  x, encoded, w, first = residuals
  # The same linear map as the forward's patches, in the form whose transpose XLA:CPU
  # runs faster.
  concatenated = functools.partial(_phase_patches, kernel_size=kernel_size, form="concatenated")
  if encoded is None:  # the direct form; x's gradient is dropped where unused (a first layer)
    grad_p = _mm(_phase_gradient(first, grad, False), w, contract_b=1)
    return (_patches_transpose(concatenated, x.shape, grad_p),
            _direct_weight_gradient(x, first, grad, kernel_size))
  rounded = _rounds_to_bfloat16(dtype, w.shape[0])
  grad_p, grad_w = _gradients(
      encoded, w, _phase_gradient(first, grad, rounded),
      lambda: _phase_gradient(first, grad, rounded, transposed=True),
      lambda: _decode(_phase_patches(_encode(x, rounded), kernel_size, "transposed"), rounded),
      rounded, eigen=jnp.dtype(dtype) == jnp.float32)
  return _patches_transpose(concatenated, x.shape, grad_p), grad_w


_phase_conv_max.defvjp(_phase_conv_max_fwd, _phase_conv_max_bwd)
# Compiled as one program even where it is called outside jit (an eager apply): the
# direct form is some 150 elementwise ops, each a pass over memory when run one by one.
_phase_conv_max = jax.jit(_phase_conv_max, static_argnums=(2, 3))


class ConvReluPool(nn.Module):
  """Conv(3x3-style, VALID) -> ReLU -> 2x2 max-pool, computed only where the pool looks.

  Same parameters and outputs as `Conv(padding="VALID")`, `relu`, `max_pool_2x2`, in
  a form XLA's CPU backend runs far faster: the convolution is evaluated separately
  at the four pooling phases (rows 2i+a, columns 2j+b), so the pool is a max over the
  four (`_max_and_first`) and its gradient a plain select; outputs the pool would drop
  (an odd last row or column) are never computed. relu(max) == max(relu), so ReLU runs
  on the pooled values only.

  The matmul operand is `_phase_patches`: rows (n, i, j, phase) by the kernel's
  (kh, kw, c), so the pool's four operands are adjacent rows. Phase-major rows cost
  two more copies and put them a whole phase apart.

  The convolution and the pool are one custom gradient (`_phase_conv_max`); in
  bfloat16 the transposed gradient its weight-gradient dot needs (`_gradients`) is
  built from the pooled arrays, 4x smaller than the [M, F] one.

  A narrow, shallow layer (`_is_direct`: the seed CNN's first, 3x3 on one channel) is
  no matmul at all: its four phases are multiply-adds fused with the pool
  (`_direct_phases`), its weight gradient one pick-and-sum per kernel entry
  (`_direct_weight_gradient`).
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
    kernel = kernel.reshape(-1, self.features)
    pooled = _phase_conv_max(x.astype(jnp.float32), kernel, (kh, kw), jnp.dtype(self.dtype))
    return nn.relu(pooled + bias)
