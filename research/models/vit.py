"""Vision Transformer (Dosovitskiy et al. 2020) in the big_vision style.

Patches -> linear embedding + learned position embedding -> pre-LayerNorm
encoder blocks -> LayerNorm -> mean over tokens (no class token) -> Dense.
Images whose sides are not multiples of `patch_size` are zero-padded at the
bottom/right, so any input size works (28x28 with patch 4 gives 7x7 tokens).
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from research import knobs
from research.models.layers import DTYPE_KNOB

# The knobs of this model (defaults: ViT's fields, or vit_ti's / vit_s's presets), for the
# registry in models/__init__.py.
KNOBS = {
    "patch_size": knobs.integer(knobs.OWN, "patch side in pixels", low=1, high=8192),
    "width": knobs.integer(knobs.OWN, "embedding width", low=1, high=65536),
    "depth": knobs.integer(knobs.OWN, "encoder blocks", low=1, high=1000),
    "num_heads": knobs.integer(knobs.OWN, "attention heads", low=1, high=65536),
    "mlp_dim": knobs.integer(knobs.OWN, "MLP width (0 = 4 x width)", high=2**20),
    "dropout_rate": knobs.number(knobs.OWN, "dropout probability", **knobs.FRACTION),
    **DTYPE_KNOB,
}


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(y)
    y = nn.gelu(y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())(y)
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class ViT(nn.Module):
  num_classes: int
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 0  # 0 = 4 * width
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    p = self.patch_size
    n, h, w, c = x.shape
    pad_h, pad_w = -h % p, -w % p
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    rows, cols = (h + pad_h) // p, (w + pad_w) // p
    # Patchify as a reshape + one matmul (the same math as a p x p stride-p conv).
    patches = x.reshape(n, rows, p, cols, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, rows * cols, p * p * c)
    x = nn.Dense(self.width, dtype=self.dtype, name="embedding")(patches)
    position = self.param("pos_embedding", nn.initializers.normal(0.02),
                          (1, rows * cols, self.width), jnp.float32)
    x = x + position.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for index in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim or 4 * self.width, self.dropout_rate,
                       self.dtype, name=f"encoder_{index}")(x, train)
    x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="head")(x).astype(jnp.float32)


vit_ti = functools.partial(ViT, width=192, depth=12, num_heads=3)
vit_s = functools.partial(ViT, width=384, depth=12, num_heads=6)
