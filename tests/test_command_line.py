"""A knob of the chosen model or optimizer that the config does not list says how to set it."""

import pytest

from research.config import command_line
from research.errors import UserError


def _message(*overrides, config_file="configs/default.py"):
  with pytest.raises(UserError) as error:
    command_line.parse_config(list(overrides), config_file)
  return str(error.value)


@pytest.mark.parametrize("overrides, config_file, expected", [
    (["--config.model.dense_features=128"], "configs/default.py",
     "--config.model.dense_features='128': configs/default.py lists only model.name; cnn has the "
     "knob dense_features (default 64): use --config=configs/default.py:model=cnn "
     "--config.model.dense_features=128"),
    # The model chosen on the command line, not the config's.
    (["--config.model.name=mlp", "--config.model.dropout_rate=0.3"], "configs/default.py",
     "mlp has the knob dropout_rate (default 0.0): use --config=configs/default.py:model=mlp "
     "--config.model.dropout_rate=0.3"),
    (["--config.optimizer.b1=0.8"], "configs/default.py",
     "adam_keras has the knob b1 (default 0.9): use "
     "--config=configs/default.py:optimizer=adam_keras --config.optimizer.b1=0.8"),
    # A config argument already given is kept.
    (["--config.optimizer.name=momentum", "--config.optimizer.nesterov=True"],
     "configs/default.py:smoke", "use --config=configs/default.py:smoke,optimizer=momentum "
     "--config.optimizer.nesterov=True"),
])
def test_a_knob_of_the_chosen_model_or_optimizer_says_how_to_set_it(overrides, config_file,
                                                                     expected):
  message = _message(*overrides, config_file=config_file)
  assert expected in message, message
  # ... and the command it gives works.
  suggested = message.split("use ", 1)[1].split()
  config = command_line.parse_config(suggested[1:], suggested[0].split("=", 1)[1])
  group, knob = suggested[-1].split("=")[0].split(".")[-2:]
  assert str(config[group][knob]) == suggested[-1].split("=")[1]


@pytest.mark.parametrize("override, expected", [
    ("--config.model.bogus=1", "config.model has no field 'bogus'. Its fields: name."),
    # cnn has no dropout: no knob to point to.
    ("--config.model.dropout_rate=0.3", "config.model has no field 'dropout_rate'. Its fields: name."),
    ("--config.optimizer.lr=0.1", "config.optimizer has no field 'lr'."),
])
def test_other_unknown_fields_keep_their_message(override, expected):
  message = _message(override)
  assert expected in message and "use --config" not in message, message


def test_the_help_lists_every_field_with_its_declaration():
  """`python -m research.command_line --config=FILE[:ARG]` (docs/extending.md)."""
  import subprocess
  import sys

  result = subprocess.run([sys.executable, "-m", "research.command_line",
                           "--config=configs/default.py:model=resnet8"], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--config.model.stem='cifar'\n    the first layers" in result.stdout
  assert "one of 'imagenet', 'cifar', 'pool'" in result.stdout
  assert "--config.schedule.decay_factor=0.1\n    piecewise:" in result.stdout
  assert "(not declared)" not in result.stdout
