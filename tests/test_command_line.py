"""research.main's command line: a knob of the chosen model or optimizer that the config
does not list says how to set it; a command built by `main_command` parses back, through
research.main's own flags, to the values it was built from."""

import math
import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import parse_as_main
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


@pytest.mark.slow
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


# ---- Building the command line -------------------------------------------------------

CNN = "configs/default.py:model=cnn"  # lists the cnn's knobs: a tuple field among them


TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)
FINITE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(learning_rate=st.floats(allow_nan=True), batch_size=st.integers(-2**70, 2**70),
       flip=st.booleans(), split=TEXT, features=st.lists(st.integers(-2**40, 2**40), max_size=4),
       boundaries=st.lists(FINITE, max_size=3), dropped=st.sampled_from([(), [], ("a", 1)]))
def test_a_built_command_parses_back_to_the_values_it_was_built_from(
    learning_rate, batch_size, flip, split, features, boundaries, dropped):
  values = {"optimizer.learning_rate": learning_rate, "batch_size": batch_size,
            "augment.flip": flip, "dataset.eval_split": split,
            "model.conv_features": tuple(features), "schedule.boundaries_epochs": boundaries,
            "schedule.boundaries_steps": dropped}
  command = command_line.main_command(CNN, "runs/x y", command_line.override_flags(values),
                                      mode="eval")
  config, parsed = parse_as_main(command)
  assert parsed["workdir"].value == "runs/x y" and parsed["mode"].value == "eval"
  got = config.optimizer.learning_rate
  assert got == learning_rate or (math.isnan(got) and math.isnan(learning_rate))
  assert config.batch_size == batch_size and config.augment.flip is flip
  assert config.dataset.eval_split == split
  assert config.model.conv_features == tuple(features)
  assert config.schedule.boundaries_epochs == tuple(boundaries)  # floats with every digit
  assert config.schedule.boundaries_steps == tuple(dropped)


def test_text_values_reach_the_field_as_typed_and_the_last_flag_wins():
  """A study's values travel as text ('(16, 32)' for a tuple field, '1e-3' for a float),
  after the flags every trial shares: the later flag for a field is the one that counts."""
  command = command_line.main_command(
      CNN, "w", ["--config.batch_size=64",
                 *command_line.override_flags({"batch_size": 128, "model.conv_features":
                                               "(16, 32)", "optimizer.learning_rate": "1e-3"})])
  assert command[3:5] == [f"--config={CNN}", "--workdir=w"]  # --config before its overrides
  config, parsed = parse_as_main(command)
  assert config.batch_size == 128 and config.model.conv_features == (16, 32)
  assert config.optimizer.learning_rate == 1e-3
  assert parsed["mode"].value == "train"  # no --mode: research.main's default


def test_numpy_scalars_are_written_as_their_python_values():
  assert [command_line.flag_value(v) for v in (np.float32(0.1), np.int64(3), np.bool_(True),
                                               (np.int32(8), np.float64(0.5)))] == [
      repr(float(np.float32(0.1))), "3", "True", "(8, 0.5)"]
  assert command_line.main_command("c.py", "w", python="python")[:3] == [
      "python", "-m", "research.main"]


@pytest.mark.parametrize("value, error, message", [
    (None, TypeError, "None (NoneType) has no --config.FIELD=VALUE form"),
    ({"a": 1}, TypeError, "has no --config.FIELD=VALUE form"),
    ((1.0, float("inf")), ValueError, "inf inside a tuple has no literal form"),
])
def test_a_value_without_a_flag_form_is_refused_by_name(value, error, message):
  with pytest.raises(error, match=re.escape(message)):
    command_line.flag_value(value)
