"""docs/extending.md's four entries, taken from its code blocks as written, registered and
run together end to end: the walk-through cannot go stale.

One in-process run at smoke size trains the new model with the new optimizer and schedule,
keeps the checkpoint the new metric calls best, and writes the metric, named by its split,
to metrics.jsonl, TensorBoard and the console.
"""

import glob
import json
import logging
import os
import re
import types

import jax
import numpy as np
import pytest

from conftest import REPO
from research import metrics, models
from research.config import command_line, config_validation
from research.errors import UserError
from research.run import checkpoint, optim, run_log, train
from research.studies import study


def _blocks() -> list[str]:
  with open(os.path.join(REPO, "docs/extending.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _entry(block: str, namespace: dict) -> dict:
  """Runs a block's definitions in `namespace`; returns its registry entry {name: entry}."""
  lines = block.splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith('"'))
  exec("\n".join(lines[:first]), namespace)
  return eval("{" + "\n".join(lines[first:]).rstrip().rstrip(",") + "}", namespace)


@pytest.fixture
def registered(monkeypatch):
  """The four entries of docs/extending.md, in their registries for this test."""
  model_file, model_line, optimizer, schedule, metric = _blocks()
  module = types.ModuleType("separable_cnn")
  exec(model_file, module.__dict__)
  added = {}
  for registry, block, namespace in [
      (models.MODELS, model_line, {"Entry": models.Entry, "separable_cnn": module}),
      (optim.OPTIMIZERS, optimizer, dict(vars(optim))),
      (optim.SCHEDULES, schedule, dict(vars(optim))),
      (metrics.METRICS, metric, {**vars(metrics), "jax": jax, "np": np})]:
    for name, entry in _entry(block, namespace).items():
      monkeypatch.setitem(registry, name, entry)
      added[name] = entry
  assert set(added) == {"separable_cnn", "adabelief", "exponential", "macro_f1"}
  return added


@pytest.mark.slow  # about 25 s on 2 idle cores (one compile of each step)
def test_the_four_entries_of_the_walk_through_train_together(registered, tmp_path, caplog):
  overrides = ["--config.schedule.name=exponential", "--config.schedule.exponential_decay_rate=0.8",
               "--config.model.width=4", "--config.optimizer.eps_root=1e-12",
               "--config.optimizer.learning_rate=0.01", "--config.best_metric=macro_f1",
               "--config.num_train_steps=20", "--config.eval_every_steps=10",
               "--config.log_every_steps=10", "--config.dataset.eval_split=test[:500]",
               "--config.eval_batch_size=500"]
  spec = "configs/default.py:model=separable_cnn,optimizer=adabelief"
  config = command_line.parse_config(overrides, spec)
  with pytest.raises(UserError, match=r"model.width=0 is not accepted: an integer from 1"):
    config_validation.validate(command_line.parse_config([*overrides, "--config.model.width=0"],
                                                         spec))
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.INFO):
    final = train.train_and_evaluate(config_validation.validate(config), workdir)
  assert 0 <= final["macro_f1"] <= 1 and final["num_examples"] == 500

  evaluations = run_log.evaluations(run_log.read_records(os.path.join(workdir, "metrics.jsonl")))
  assert [(r["step"], r["split"], r["kind"]) for r in evaluations] == [
      (10, "test[:500]", "eval"), (20, "test[:500]", "eval")]
  assert all("macro_f1" in r for r in evaluations)
  tags = {value.tag for path in glob.glob(os.path.join(workdir, "tensorboard", "*tfevents*"))
          for event in run_log._read_events(path) for value in event.summary.value}
  assert {"test.start_to_500/macro_f1", "test.start_to_500/accuracy", "train/loss"} <= tags
  assert re.search(r"step 20 epoch .* \| test\[:500\] loss .* macro_f1 0\.\d{4}", caplog.text)

  # The best checkpoint is the one macro-F1 prefers; a study may optimize it.
  best = max(evaluations, key=lambda r: r["macro_f1"])
  reader = checkpoint.Checkpointer(workdir, best_metric="macro_f1", read_only=True)
  assert reader.resolve_step("best") == best["step"]
  reader.close()
  assert study.OBJECTIVES["macro_f1"] == "maximize"
