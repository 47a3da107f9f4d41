"""End to end: `python -m research.main` as a user runs it, on real Fashion-MNIST."""

import json
import os

import pytest
from conftest import run_main

SMOKE = "--config=configs/default.py:smoke"


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_writes_config_metrics_checkpoints_then_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  first = run_main(workdir, SMOKE)
  assert first.returncode == 0, first.stderr[-3000:]
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["model"]["name"] == "cnn" and config["num_train_steps"] == 300
  records = _records(workdir)
  train_lines = [r for r in records if r["split"] == "train"]
  test_lines = [r for r in records if r["split"] == "test[:1000]"]  # smoke's eval split
  assert [r["step"] for r in train_lines] == [50, 100, 150, 200, 250, 300]
  assert [r["step"] for r in test_lines] == [150, 300]
  for record in records:
    assert {"step", "epoch", "split", "loss", "accuracy", "elapsed"} <= set(record)
  assert all(r["num_examples"] == 1000 for r in test_lines)
  assert test_lines[-1]["accuracy"] > 0.7
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["150", "300"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))

  # The same command again: finished, says so, trains nothing.
  again = run_main(workdir, SMOKE)
  assert again.returncode == 0
  assert "already finished at step 300" in again.stderr
  assert len(_records(workdir)) == len(records)

  # Longer run on the same workdir: resumes at 300 and continues to 450.
  longer = run_main(workdir, SMOKE, "--config.num_train_steps=450", "--allow_config_change")
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "Resumed from checkpoint step 300" in longer.stderr
  steps = [r["step"] for r in _records(workdir) if r["split"] == "train"]
  assert steps == [50, 100, 150, 200, 250, 300, 350, 400, 450]


def test_bad_config_value_exits_2_with_a_message_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(str(workdir), SMOKE, "--config.optimizer.learning_rate=-1")
  assert result.returncode == 2
  assert "optimizer.learning_rate" in result.stderr and "Traceback" not in result.stderr
  assert not workdir.exists()
