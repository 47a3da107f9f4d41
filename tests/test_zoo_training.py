"""Every model of the zoo trains a few steps on real Fashion-MNIST batches: the quick ones
here; the ResNets, compile-bound and so slow, in test_zoo_resnets.py (a file of its own, so
that `make test`'s workers run it beside this one). A ResNet that is another one with more
blocks (REPEATS) runs that one's layer code: test_zoo_resnets.py holds it to that."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_zoo import SMALL_KNOBS, _model, _quick_jit, _train

# Compile-bound, so slow: the ResNets of test_zoo_resnets.py (basic blocks of ImageNet
# width, wide blocks, bottlenecks; resnet8 trains here).
RESNETS = {"resnet18", "wide_resnet", "resnet50"}
# Each ResNet that is another model's network class, blocks and knobs with more blocks, and
# that model (trained, and compared in both convolution forms in test_accelerator_forms.py).
REPEATS = {"resnet14": "resnet8", "resnet20": "resnet8", "resnet32": "resnet8",
           "resnet56": "resnet8", "resnet34": "resnet18"}


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


@pytest.mark.parametrize("name", sorted(set(SMALL_KNOBS) - RESNETS - set(REPEATS)))
@pytest.mark.slow
def test_every_model_trains_a_few_steps_on_real_batches(fashion_mnist, name):
  trains_a_few_steps(fashion_mnist, name)
