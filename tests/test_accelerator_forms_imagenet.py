"""The ImageNet ResNets (basic blocks and bottlenecks) in their accelerator
form (conv_impl="xla") against the CPU form (im2col): values and gradients. Compile-bound,
so slow, and in a file of their own; the checks are test_accelerator_forms.py's."""

import pytest

from test_accelerator_forms import IMAGENET_RESNETS, forms_agree


@pytest.mark.slow
@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compared within tolerances
@pytest.mark.parametrize("name", IMAGENET_RESNETS)
def test_xla_convolutions_give_the_im2col_outputs_and_gradients_in_float32(name):
  forms_agree(name)
