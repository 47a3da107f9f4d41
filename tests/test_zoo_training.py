"""Every model of the zoo trains a few steps on real Fashion-MNIST batches: the quick ones
here; the ResNets, compile-bound and so slow, in test_zoo_resnets.py and test_zoo_deep.py
(files of their own, so that `make test`'s workers run them side by side)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_zoo import SMALL_KNOBS, _model, _quick_jit, _train

# Compile-bound, so slow: the ResNets of test_zoo_resnets.py, and their deeper siblings
# (same blocks, more of them) of test_zoo_deep.py.
RESNETS = {"resnet14", "resnet18", "resnet20", "wide_resnet"}
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


@pytest.mark.parametrize("name", sorted(set(SMALL_KNOBS) - RESNETS - DEEP))
@pytest.mark.slow
def test_every_model_trains_a_few_steps_on_real_batches(fashion_mnist, name):
  trains_a_few_steps(fashion_mnist, name)
