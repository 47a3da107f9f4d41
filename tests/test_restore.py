"""Restoring what a run wrote: the newest readable checkpoint after a damaged one, one chosen
step in eval mode, another run's parameters (init_from), a model that does not match."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import records, run_here
from test_resume import RUN


def _finished_run(tmp_path_factory, name, steps):
  workdir = str(tmp_path_factory.mktemp(name))
  result = run_here(workdir, *RUN[:1], f"--config.num_train_steps={steps}", *RUN[2:])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def run_of_90_steps(tmp_path_factory):
  """A finished 90-step run (checkpoints 30, 60, 80, 90): tests copy it before changing it."""
  return _finished_run(tmp_path_factory, "ninety", 90)


@pytest.fixture(scope="module")
def run_of_30_steps(tmp_path_factory):
  """A finished 30-step run, only read: the source of fine-tuning and restoring tests."""
  return _finished_run(tmp_path_factory, "thirty", 30)


def _copy(workdir, tmp_path) -> str:
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, symlinks=True)
  return copy


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(run_of_90_steps, tmp_path):
  workdir = _copy(run_of_90_steps, tmp_path)
  data_dir = os.path.join(workdir, "checkpoints", "90", "state", "ocdbt.process_0", "d")
  for name in os.listdir(data_dir):
    path = os.path.join(data_dir, name)
    os.truncate(path, os.path.getsize(path) // 2)
  longer = run_here(workdir, *RUN[:1], "--config.num_train_steps=120", *RUN[2:],
                    "--allow_config_change")
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "Skipping checkpoint step 90" in longer.stderr
  assert "Resumed from checkpoint step 80" in longer.stderr  # the newest readable one
  assert os.listdir(os.path.join(workdir, "checkpoints_unreadable"))  # kept, not deleted
  assert "90" in os.listdir(os.path.join(workdir, "checkpoints"))  # written again


@pytest.mark.slow
def test_eval_mode_evaluates_a_chosen_step_without_training(run_of_90_steps, tmp_path):
  workdir = _copy(run_of_90_steps, tmp_path)
  before = records(workdir)
  result = run_here(workdir, "--mode=eval", "--config.eval.checkpoint_step=60")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval.jsonl")) as f:
    record = json.loads(f.readline())
  assert record["step"] == 60 and record["split"] == "test" and record["num_examples"] == 10000
  assert 0 < record["accuracy"] <= 1 and len(record["params_fingerprint"]) == 12
  assert records(workdir) == before  # no training happened
  missing = run_here(workdir, "--mode=eval", "--config.eval.checkpoint_step=61")
  assert missing.returncode == 2 and "one of the steps [60, 80, 90]" in missing.stderr


@pytest.mark.slow
def test_init_from_another_run_and_head_reinitialization(run_of_30_steps, tmp_path):
  source = run_of_30_steps
  fine_tuned = run_here(str(tmp_path / "fine_tuned"), *RUN[:1], "--config.num_train_steps=10",
                        f"--config.init_from={source}")
  assert fine_tuned.returncode == 0, fine_tuned.stderr[-3000:]
  assert f"Initialized from {source} step 30" in fine_tuned.stderr


@pytest.mark.slow
def test_restoring_into_a_different_model_names_the_mismatching_parameters(run_of_30_steps):
  import jax
  import optax

  from research import mesh as mesh_lib
  from research.run import checkpoint, train
  from research.errors import UserError
  from research.models.cnn import CNN

  workdir = run_of_30_steps
  wider = CNN(num_classes=10, conv_features=(48, 64))
  abstract = jax.eval_shape(lambda: train.create_state(wider, optax.adam(1e-3), (28, 28, 1), 0))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=mesh_lib.replicated(mesh_lib.make_mesh())), abstract)
  with pytest.raises(UserError) as error:
    checkpoint.Checkpointer(workdir, read_only=True).restore(abstract)
  message = str(error.value)
  assert "params/Conv_0/kernel: checkpoint (3, 3, 1, 32), model (3, 3, 1, 48)" in message
  assert "Traceback" not in message


@pytest.mark.slow
def test_init_from_reinitializes_the_head_only_when_asked(run_of_30_steps):
  import jax
  import optax

  from research.run import checkpoint, train
  from research.errors import UserError
  from research.models.cnn import CNN

  source = run_of_30_steps
  five_classes = train.create_state(CNN(num_classes=5), optax.adam(1e-3), (28, 28, 1), 0)
  with pytest.raises(UserError) as error:
    checkpoint.initialize_from(five_classes, source, num_classes=5, reinit_head=False)
  assert "params/Dense_1/kernel: (64, 10)" in str(error.value)
  assert "init_reinit_head=True" in str(error.value)
  started = checkpoint.initialize_from(five_classes, source, num_classes=5, reinit_head=True)
  restored = checkpoint.Checkpointer(source, read_only=True)
  stored = restored.manager.restore(30, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardRestore())).state["params"]
  np.testing.assert_array_equal(started.params["Conv_0"]["kernel"], stored["Conv_0"]["kernel"])
  np.testing.assert_array_equal(started.params["Dense_1"]["kernel"],
                                five_classes.params["Dense_1"]["kernel"])  # fresh head
  assert jax.tree.structure(started) == jax.tree.structure(five_classes)
