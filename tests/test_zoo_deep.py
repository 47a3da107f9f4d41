"""The deeper ResNets of the zoo train a few steps on real batches, as every model does in
test_zoo_training.py: compile-bound, so slow, and in a file of their own."""

import pytest

from test_zoo_training import DEEP, trains_a_few_steps


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEEP))
def test_every_model_trains_a_few_steps_on_real_batches(fashion_mnist, name):
  trains_a_few_steps(fashion_mnist, name)
