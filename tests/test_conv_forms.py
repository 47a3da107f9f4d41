"""The project's Conv takes what flax.linen.Conv takes, in both of its forms.

Plain convolutions (any strides and padding) run in the fast CPU form (im2col); dilated
and grouped ones run as lax.conv. Each form gives flax.linen.Conv's values and gradients
from the same parameters.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from research.models import layers

IMAGES = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))


def _against_flax(impl, **settings):
  ours = layers.Conv(8, (3, 3), impl=impl, **settings)
  reference = nn.Conv(8, (3, 3), **settings)
  variables = reference.init(jax.random.key(1), IMAGES)
  # One compiled program per module: values and gradients together.
  run = lambda module: jax.jit(jax.value_and_grad(
      lambda v: jnp.sum(jnp.sin(module.apply(v, IMAGES)))))(variables)
  (value, grads), (expected, expected_grads) = run(ours), run(reference)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, atol=2e-5)
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, IMAGES),
                             reference.apply(variables, IMAGES), atol=2e-6)


@pytest.mark.parametrize("settings", [{"strides": 2}, {"padding": ((1, 0), (0, 2))}])
@pytest.mark.slow
def test_plain_convolutions_take_the_fast_cpu_form_and_equal_flax(settings):
  assert layers.form("im2col") == "im2col"
  _against_flax("im2col", **settings)


@pytest.mark.parametrize("settings", [{"feature_group_count": 4, "strides": 2},
                                      {"kernel_dilation": 2}])
@pytest.mark.slow
def test_grouped_and_dilated_convolutions_run_as_lax_conv_and_equal_flax(settings):
  assert layers.form("im2col", _dilation(settings), settings.get("feature_group_count", 1)) == "xla"
  _against_flax("im2col", **settings)  # asked for the CPU form: lax.conv is taken instead


def _dilation(settings):
  value = settings.get("kernel_dilation", 1)
  return (value, value)
