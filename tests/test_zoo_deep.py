"""The deeper ResNets of the zoo. resnet50, the only one built of bottleneck blocks, trains a
few steps on real batches, as every model does in test_zoo_training.py (compile-bound, so
slow, and in a file of their own). resnet32, resnet56 and resnet34 are the blocks of
resnet20 and resnet18, which train in test_zoo_resnets.py, repeated more times (the test
below holds them to that); test_accelerator_forms_*.py computes their outputs and
gradients in both convolution forms and compares them."""

import pytest

from research import models
from test_zoo_training import DEEP, trains_a_few_steps

# Each deep model and the trained model whose blocks it repeats (None: trained itself).
SAME_BLOCKS_AS = {"resnet32": "resnet20", "resnet56": "resnet20", "resnet34": "resnet18",
                  "resnet50": None}
DEPTH_ARGUMENTS = {"blocks_per_stage", "stage_sizes"}


def test_the_deep_resnets_repeat_the_blocks_of_a_trained_model():
  assert set(SAME_BLOCKS_AS) == DEEP
  for deep, shallow in SAME_BLOCKS_AS.items():
    if shallow is None:
      continue
    deep_builder, shallow_builder = models.MODELS[deep].constructor, models.MODELS[shallow].constructor
    assert deep_builder.func is shallow_builder.func, deep  # the same network class
    differing = {key for key in {**deep_builder.keywords, **shallow_builder.keywords}
                 if deep_builder.keywords.get(key) != shallow_builder.keywords.get(key)}
    assert differing <= DEPTH_ARGUMENTS, (deep, differing)  # only how many blocks
    assert models.MODELS[deep].knobs == models.MODELS[shallow].knobs, deep


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, same in SAME_BLOCKS_AS.items() if same is None])
def test_every_model_trains_a_few_steps_on_real_batches(fashion_mnist, name):
  trains_a_few_steps(fashion_mnist, name)
