"""The accelerator form of every convolutional model (conv_impl="xla", what GPUs and TPUs
run) against the CPU form (im2col), tested on the CPU: values, gradients, training."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import models
from research.data import datasets
from research.models import layers
from research.run import steps, train
from test_zoo_resnets import assert_repeats_the_blocks_of
from test_zoo_training import REPEATS

CONV_MODELS = [name for name, entry in models.MODELS.items() if "conv_impl" in entry.knobs]
# Small versions of each (same layers and depth, fewer channels): compile time dominates.
SMALL = {"cnn": {"conv_features": (4, 8), "dense_features": 16},
         "wide_resnet": {"depth": 10, "width": 1}}


def _model(name: str, conv_impl: str, dtype: str = "float32"):
  knobs = SMALL.get(name, {"width": 4})
  config = ml_collections.ConfigDict({"name": name, "conv_impl": conv_impl, "dtype": dtype,
                                      **knobs})
  return models.build(config, num_classes=10)


# The ImageNet ResNets (basic blocks, bottlenecks), compile-bound, are in a file of their own
# so that no file takes minutes: test_accelerator_forms_imagenet.py.
IMAGENET_RESNETS = ["resnet18", "resnet50"]


def test_every_convolutional_model_of_the_zoo_is_covered():
  assert set(CONV_MODELS) == {"cnn", "resnet8", "resnet14", "resnet20", "resnet32", "resnet56",
                              "resnet18", "resnet34", "resnet50", "wide_resnet"}
  here = {"cnn", "resnet8", "wide_resnet"}
  # Every other one is a compared model with more blocks (REPEATS: the same class, blocks
  # and knobs, only the depth differs): the same layers, in both forms.
  assert set(CONV_MODELS) == here | set(IMAGENET_RESNETS) | set(REPEATS)
  for deep, compared in REPEATS.items():
    assert compared in here | set(IMAGENET_RESNETS)
    assert_repeats_the_blocks_of(deep, compared)


# Each compiles two programs of a whole model and its gradient (5-15 s here).
@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compared within tolerances
@pytest.mark.parametrize("name", ["cnn", "resnet8", "wide_resnet"])
@pytest.mark.slow
def test_xla_convolutions_give_the_im2col_outputs_and_gradients_in_float32(name):
  forms_agree(name)


def forms_agree(name: str) -> None:
  """Model `name` in both forms: the same eval- and train-mode logits and gradients."""
  # Tolerances: both forms are float32 sums of the same products in another order
  # (lax.conv against one matmul over gathered patches), so they differ by rounding
  # alone: ~1e-7 relative per layer, growing with depth; train-mode BatchNorm divides by
  # batch statistics and so magnifies small absolute differences of near-constant
  # channels. 1e-4 of each array's scale is >100x the rounding seen, and far below any
  # real difference (a wrong padding, stride or kernel layout changes values by O(1)).
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  labels = jnp.arange(4) % 10
  cpu_form, accelerator_form = _model(name, "im2col"), _model(name, "xla")
  variables = jax.jit(cpu_form.init)(jax.random.key(0), x)  # one program, not op by op
  assert (jax.tree.structure(variables)
          == jax.tree.structure(jax.eval_shape(accelerator_form.init, jax.random.key(0), x)))

  @functools.partial(jax.jit, static_argnums=0)  # one program per form: eager ops are slow
  def outputs_and_gradients(model, variables):
    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), logits

    (_, train_logits), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return model.apply(variables, x), train_logits, grads

  *ours, grads = outputs_and_gradients(cpu_form, variables)
  *theirs, their_grads = outputs_and_gradients(accelerator_form, variables)
  for a, b in zip(ours, theirs):  # eval-mode and train-mode logits
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * (float(jnp.abs(a).max()) + 1e-6))
  for path, ours in jax.tree_util.tree_leaves_with_path(grads):
    theirs = their_grads
    for key in path:
      theirs = theirs[key.key]
    scale = float(jnp.abs(ours).max()) + 1e-8
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-4 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def small_split(fashion_mnist):
  _, train_split, _ = fashion_mnist
  return datasets.Split(train_split.images[:8192], train_split.labels[:8192])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_a_short_run_in_the_accelerator_form_stays_finite_and_learns(small_split, dtype):
  model = _model("cnn", "xla", dtype)
  tx = optax.adam(3e-3)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))
  indices = datasets.batch_indices(0, 0, 60, 64, len(small_split))
  state, metrics = run(train.create_state(model, tx, (28, 28, 1), 0), small_split.images,
                       small_split.labels, indices)
  losses = np.asarray(metrics["loss"])
  assert np.isfinite(losses).all() and np.isfinite(np.asarray(metrics["grad_norm"])).all()
  assert losses[-10:].mean() < 0.75 * losses[:10].mean(), losses
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


@pytest.mark.usefixtures("cheap_compiles")
@pytest.mark.parametrize("layer", [
    functools.partial(layers.Conv, 8, (3, 3), impl="xla", dtype=jnp.bfloat16),
    functools.partial(layers.Dense, 8, impl="xla", dtype=jnp.bfloat16)])
@pytest.mark.slow
def test_bfloat16_layers_add_biases_and_sum_their_gradients_in_float32(layer):
  module = layer()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  variables = module.init(jax.random.key(1), x)
  forward = jax.make_jaxpr(module.apply)(variables, x)
  adds = [e for e in forward.eqns if e.primitive.name == "add"]
  assert adds and all(e.outvars[0].aval.dtype == jnp.float32 for e in adds), adds
  assert module.apply(variables, x).dtype == jnp.bfloat16  # activations stay bfloat16
  gradient = lambda v: jax.grad(lambda v: jnp.sum(module.apply(v, x).astype(jnp.float32)))(v)
  sums = [e for e in jax.make_jaxpr(gradient)(variables).eqns
          if e.primitive.name == "reduce_sum"]
  assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums), sums
  assert gradient(variables)["params"]["bias"].dtype == jnp.float32
