"""Every model of the zoo trains a few steps on real Fashion-MNIST batches (the deeper
ResNets are in test_zoo_deep.py: a file of their own, so the two run side by side)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_zoo import SMALL_KNOBS, _model, _quick_jit, _train

# Deeper siblings of resnet20 / resnet18 (same blocks, more of them): compile-bound, so slow.
DEEP = {"resnet32", "resnet56", "resnet34", "resnet50"}


def trains_a_few_steps(fashion_mnist, name):
  _, train_split, _ = fashion_mnist
  model = _model(name, **SMALL_KNOBS[name])
  initial, (state, metrics) = _train(model, train_split, num_steps=2, batch_size=8)
  assert np.all(np.isfinite(metrics["loss"])) and int(state.step) == 2
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == jnp.float32
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial.params),
                                                    jax.tree.leaves(state.params))]
  assert all(changed)  # every parameter received a gradient
  logits = _quick_jit(lambda: model.apply({"params": state.params, **state.model_state},
                                          jnp.zeros((2, 28, 28, 1)), train=False))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(set(SMALL_KNOBS) - DEEP))
def test_every_model_trains_a_few_steps_on_real_batches(fashion_mnist, name):
  trains_a_few_steps(fashion_mnist, name)
