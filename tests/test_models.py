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


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 13, 13, 32), (2, 12, 11, 3)])
def test_conv_relu_pool_equals_conv_then_relu_then_pool(shape):
  from research.models.layers import ConvReluPool

  x = jax.random.normal(jax.random.key(1), shape)
  fused = ConvReluPool(8)
  variables = fused.init(jax.random.key(0), x)
  reference = lambda v, x: max_pool_2x2(nn.relu(nn.Conv(8, (3, 3), padding="VALID").apply(v, x)))
  np.testing.assert_allclose(fused.apply(variables, x), reference(variables, x), atol=1e-5)
  loss = lambda f: lambda v, x: jnp.sum(f(v, x) ** 2)
  for argnum in (0, 1):  # parameters and input
    ours = jax.grad(loss(fused.apply), argnum)(variables, x)
    theirs = jax.grad(loss(reference), argnum)(variables, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_both_cnn_forms_share_parameters_and_outputs():
  x = jax.random.uniform(jax.random.key(3), (4, 28, 28, 1))
  fast, plain = CNN(num_classes=10), CNN(num_classes=10, conv_impl="xla")
  variables = fast.init(jax.random.key(0), x)
  assert jax.tree.structure(variables) == jax.tree.structure(plain.init(jax.random.key(0), x))
  np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), atol=1e-5)
