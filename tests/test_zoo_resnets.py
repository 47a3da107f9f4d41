"""The zoo's ResNets (resnet14, resnet18, resnet20, wide_resnet) train a few steps on real
batches, as every model does in test_zoo_training.py: compile-bound, so slow."""

import pytest

from test_zoo_training import RESNETS, trains_a_few_steps


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESNETS))
def test_every_model_trains_a_few_steps_on_real_batches(fashion_mnist, name):
  trains_a_few_steps(fashion_mnist, name)
