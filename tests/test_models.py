import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.cnn import CNN
from research.models.layers import Conv, max_pool_2x2


def test_seed_cnn_has_the_keras_parameter_count_and_output_shape():
  model = CNN(num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert sum(x.size for x in jax.tree.leaves(variables)) == 121_930
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes["Conv_0"]["kernel"] == (3, 3, 1, 32)
  assert shapes["Conv_1"]["kernel"] == (3, 3, 32, 64)
  assert shapes["Dense_0"]["kernel"] == (1600, 64)
  assert shapes["Dense_1"]["kernel"] == (64, 10)
  logits = model.apply(variables, jnp.zeros((5, 28, 28, 1)))
  assert logits.shape == (5, 10) and logits.dtype == jnp.float32


def test_seed_cnn_uses_keras_initializers():
  params = CNN(num_classes=10).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  for layer in params.values():
    assert not np.any(np.asarray(layer["bias"]))  # zero biases
  kernel = np.asarray(params["Dense_0"]["kernel"])
  limit = np.sqrt(6 / (1600 + 64))  # Glorot-uniform bound
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), "VALID"), ((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"),
    ((1, 1), (2, 2), "SAME"), ((7, 7), (2, 2), "SAME")])
def test_im2col_conv_matches_flax_conv(kernel, strides, padding):
  x = jax.random.normal(jax.random.key(1), (2, 11, 9, 5))
  ours = Conv(4, kernel, strides, padding)
  variables = ours.init(jax.random.key(0), x)
  reference = nn.Conv(4, kernel, strides, padding).apply(variables, x)
  np.testing.assert_allclose(ours.apply(variables, x), reference, atol=1e-5)
  gradient = lambda module: jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))(variables)
  np.testing.assert_allclose(gradient(ours)["params"]["kernel"],
                             gradient(nn.Conv(4, kernel, strides, padding))["params"]["kernel"],
                             rtol=1e-4, atol=1e-4)


def test_max_pool_matches_flax_including_odd_sizes():
  x = jax.random.normal(jax.random.key(2), (3, 11, 13, 4))
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
