"""The deeper CIFAR ResNets (resnet8's blocks, 5 and 9 per stage) in their accelerator
form (conv_impl="xla") against the CPU form (im2col): values and gradients. Compile-bound,
so slow, and in a file of their own; the checks are test_accelerator_forms.py's."""

import pytest

from test_accelerator_forms import CIFAR_RESNETS, forms_agree


@pytest.mark.slow
@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compared within tolerances
@pytest.mark.parametrize("name", CIFAR_RESNETS)
def test_xla_convolutions_give_the_im2col_outputs_and_gradients_in_float32(name):
  forms_agree(name)
