"""The ImageNet ResNets (basic blocks and bottlenecks) in their accelerator
form (conv_impl="xla") against the CPU form (im2col): values and gradients. Compile-bound,
so slow, and in a file of their own; the checks are test_accelerator_forms.py's.

Each is compared with the fewest blocks that still hold every kind of block it has: the
full depth repeats these same blocks at the same shapes (as REPEATS' models repeat those
of test_accelerator_forms.py), and test_zoo_resnets.py trains the full depth."""

import dataclasses
import functools

import pytest

from research import models
from test_accelerator_forms import IMAGENET_RESNETS, forms_agree

# Stages of one block: the first stage's (stride 1; identity shortcut in basic blocks,
# projection in bottlenecks) and the others' (stride 2, projection). ResNet-50's first stage
# has a second block: the identity-shortcut bottleneck.
FEWEST_BLOCKS = {"resnet18": (1, 1, 1, 1), "resnet50": (2, 1, 1, 1)}


@pytest.mark.slow
@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compared within tolerances
@pytest.mark.parametrize("name", IMAGENET_RESNETS)
def test_xla_convolutions_give_the_im2col_outputs_and_gradients_in_float32(name, monkeypatch):
  entry = models.MODELS[name]
  assert len(entry.constructor.keywords["stage_sizes"]) == len(FEWEST_BLOCKS[name])
  monkeypatch.setitem(models.MODELS, name, dataclasses.replace(
      entry, constructor=functools.partial(entry.constructor, stage_sizes=FEWEST_BLOCKS[name])))
  forms_agree(name)
