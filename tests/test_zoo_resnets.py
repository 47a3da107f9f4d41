"""The zoo's ResNets train a few steps on real batches, as every model does in
test_zoo_training.py (compile-bound, so slow): resnet18 (ImageNet basic blocks),
wide_resnet and resnet50 (bottlenecks); resnet8 trains there. The other ResNets are one of
these with more blocks (REPEATS), held to that below: the same layer code."""

import pytest

from research import models
from test_zoo_training import REPEATS, RESNETS, SMALL_KNOBS, trains_a_few_steps

DEPTH_ARGUMENTS = {"blocks_per_stage", "stage_sizes"}


def assert_repeats_the_blocks_of(deep: str, shallow: str) -> None:
  """Model `deep` is model `shallow`'s network class, blocks and knobs, with more blocks:
  it runs the same layer code, and what is tested of `shallow`'s layers holds for it."""
  deep_builder = models.MODELS[deep].constructor
  shallow_builder = models.MODELS[shallow].constructor
  assert deep_builder.func is shallow_builder.func, deep  # the same network class
  differing = {key for key in {**deep_builder.keywords, **shallow_builder.keywords}
               if deep_builder.keywords.get(key) != shallow_builder.keywords.get(key)}
  assert differing <= DEPTH_ARGUMENTS, (deep, differing)  # only how many blocks
  assert models.MODELS[deep].knobs == models.MODELS[shallow].knobs, deep


def test_the_resnets_not_trained_repeat_the_blocks_of_a_trained_model():
  assert set(REPEATS) | RESNETS | {"resnet8"} == {name for name in SMALL_KNOBS if "resnet" in name}
  for deep, shallow in REPEATS.items():
    assert shallow in RESNETS | {"resnet8"}
    assert_repeats_the_blocks_of(deep, shallow)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESNETS))
def test_every_model_trains_a_few_steps_on_real_batches(fashion_mnist, name):
  trains_a_few_steps(fashion_mnist, name)
