"""A workdir resumes under newer code when only fields at their defaults were added.

The stored config is today's shape: config.json as the training loop writes it
(`train._write_config`). Newer code is simulated by declaring one more field.
"""

import json
import logging
import os

import pytest

from research.config import command_line, config_schema, config_validation, workdir_config
from research.errors import UserError
from research.knobs import integer
from research.run import train


@pytest.fixture
def workdir(tmp_path):
  train._write_config(command_line.parse_config([]), str(tmp_path))  # today's config.json
  return str(tmp_path)


@pytest.fixture
def newer_code(monkeypatch):
  """The code after a field `eval_every_minutes` (default 0) was added."""
  monkeypatch.setitem(config_schema.FIELDS, "eval_every_minutes",
                      integer(0, "evaluate every this many minutes (0 = off)"))

  def config(**values):
    found = command_line.parse_config([]).to_dict()
    found.update({"eval_every_minutes": 0, **values})
    import ml_collections

    return ml_collections.ConfigDict(found)

  return config


def test_a_field_added_at_its_default_resumes_without_allow_config_change(workdir, newer_code):
  workdir_config.check(newer_code(), workdir, allow_change=False)
  with pytest.raises(UserError, match=r"eval_every_minutes: <absent> in the workdir, 5 now"):
    workdir_config.check(newer_code(eval_every_minutes=5), workdir, False)
  workdir_config.check(newer_code(eval_every_minutes=5), workdir, True)
  with pytest.raises(UserError, match="batch_size: 32 in the workdir, 64 now"):
    workdir_config.check(newer_code(batch_size=64), workdir, False)


def test_a_stored_field_the_code_no_longer_reads_is_named_and_ignored(workdir, caplog):
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    stored = json.load(f)
  stored["augment"]["mixup"] = 0.2  # written by a version that had this field
  with open(path, "w") as f:
    json.dump(stored, f)
  with caplog.at_level(logging.WARNING):
    workdir_config.check(command_line.parse_config([]), workdir, False)
    config = workdir_config.read_stored(stored)
  assert "augment.mixup" in caplog.text
  assert "mixup" not in config.augment and config.augment.flip is False
  config_validation.validate(config)


def test_a_stored_config_is_read_through_todays_schema(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    stored = json.load(f)
  del stored["matmul_precision"], stored["schedule"]["decay_factor"]  # older code lacked them
  config = workdir_config.read_stored(stored)
  assert config.matmul_precision == "default" and config.schedule.decay_factor == 0.1
  assert "width" not in config.model  # a model's own knobs default in its code
  config_validation.validate(config)
