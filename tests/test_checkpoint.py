"""Checkpoints on real Orbax files: retention, fingerprints, damaged steps set aside, a
damaged config.json rebuilt from them, and init_from's advice across architectures."""

import gc
import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_here
from research.errors import UserError
from research.run import checkpoint

# Orbax's remaining reads of a step it failed to read end, when collected, as "coroutine
# ignored" warnings in whichever test runs then: collected here, quietly.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module", autouse=True)
def _collect_abandoned_reads():
  yield
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    gc.collect()


def _state(step):
  return {"step": jnp.int32(step), "params": {"w": jnp.full((3,), float(step))}}


@pytest.mark.parametrize("metric,values,best", [
    ("accuracy", [0.5, 0.9, 0.6, 0.7, 0.65], 2),
    ("loss", [0.5, 0.9, 0.1, 0.7, 0.65], 3)])
def test_keeps_the_last_n_and_the_best_by_the_chosen_metric(tmp_path, metric, values, best):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric=metric)
  for step, value in enumerate(values, start=1):
    state = _state(step)
    ckpt.manager.save(step, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardSave(state), meta=checkpoint.ocp.args.JsonSave({})),
        metrics={metric: value})
  ckpt.wait()
  assert ckpt.steps() == sorted({best, 4, 5})
  assert ckpt.best_step() == best
  assert ckpt.resolve_step("best") == best and ckpt.resolve_step("latest") == 5
  ckpt.close()


def test_fingerprint_changes_with_any_bit_and_not_with_dict_order():
  a = {"x": jnp.arange(4.0), "y": jnp.ones((2, 2))}
  b = {"y": jnp.ones((2, 2)), "x": jnp.arange(4.0)}
  c = {"x": jnp.arange(4.0).at[3].set(3.0000002), "y": jnp.ones((2, 2))}
  assert checkpoint.fingerprint(a) == checkpoint.fingerprint(b)
  assert checkpoint.fingerprint(a) != checkpoint.fingerprint(c)


# ---- Damaged steps: set aside, never a traceback, never wrong parameters --------------------
# One small real run (steps 5, 10, 15, 20; evaluations at 10 and 20), copied per case.

SMALL_RUN = ["--config.num_train_steps=20", "--config.checkpoint_every_steps=5",
             "--config.eval_every_steps=10", "--config.log_every_steps=5",
             "--config.keep_checkpoints=4", "--config.dataset.eval_split=test[:500]",
             "--config.eval_batch_size=500"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, fashion_mnist):
  """(workdir, abstract state, {step: params fingerprint}) of a finished 20-step run."""
  from research import mesh as mesh_lib
  from research.config import command_line, config_validation
  from research.run import train

  workdir = str(tmp_path_factory.mktemp("small") / "run")
  config = command_line.parse_config(SMALL_RUN, "configs/default.py:smoke")
  train.train_and_evaluate(config_validation.validate(config), workdir)
  _, _, _, abstract = train.build_model_and_state(config, fashion_mnist[0], mesh_lib.make_mesh())
  reader = checkpoint.Checkpointer(workdir, read_only=True)
  fingerprints = {step: checkpoint.fingerprint(reader.restore(abstract, step)[0].params)
                  for step in reader.steps()}
  reader.close()
  assert sorted(fingerprints) == [5, 10, 15, 20]
  return workdir, abstract, fingerprints


# Each kind of file of a step (glob patterns inside the step folder). Orbax needs the first
# ones to read a step; commit markers, _sharding and array_metadatas only when present.
STEP_FILES = ["_CHECKPOINT_METADATA", "commit_success.txt", "meta/metadata",
              "meta/commit_success.txt", "metrics/metrics", "state/_METADATA", "state/_sharding",
              "state/array_metadatas/*", "state/manifest.ocdbt", "state/d/*",
              "state/ocdbt.process_0/d/*"]
OPTIONAL = {"commit_success.txt", "meta/commit_success.txt", "state/_sharding",
            "state/array_metadatas/*"}
DAMAGES = {
    "truncated": lambda content: content[:len(content) // 2],
    "empty": lambda content: b"",
    "random bytes": lambda content: np.random.default_rng(len(content)).bytes(max(16, len(content))),
    "deleted": None,
}


def _damage(step_dir: str, pattern: str, how: str) -> list[str]:
  paths = sorted(glob.glob(os.path.join(step_dir, pattern)))
  for path in paths:
    with open(path, "rb") as f:
      content = f.read()
    os.remove(path)
    if DAMAGES[how] is not None:
      with open(path, "wb") as f:
        f.write(DAMAGES[how](content))
  return paths


# The newest step damaged in each way; or every step, each in another way.
CASES = [(pattern, {20: how}) for pattern in STEP_FILES for how in DAMAGES] + [
    (pattern, dict(zip([5, 10, 15, 20], DAMAGES))) for pattern in STEP_FILES]


@pytest.mark.parametrize("pattern, damages", CASES,
                         ids=[f"{p}-{'every step' if len(d) > 1 else d[20]}" for p, d in CASES])
@pytest.mark.slow
def test_a_damaged_file_sets_its_step_aside_and_the_newest_readable_one_is_restored(
    small_run, tmp_path, caplog, pattern, damages):
  source, abstract, fingerprints = small_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  damaged = {step: _damage(os.path.join(workdir, "checkpoints", str(step)), pattern, how)
             for step, how in damages.items()}
  damaged = {step: paths for step, paths in damaged.items() if paths}  # metrics: evaluated steps
  assert damaged

  ckpt = checkpoint.Checkpointer(workdir, keep=4)
  restored = ckpt.restore(abstract)
  ckpt.close()
  # Orbax's abandoned reads of a failed step: collected here, under pytestmark; the young
  # generations only (a full collection costs a second per case in a worker whose heap
  # earlier files filled); what outlives them, _collect_abandoned_reads collects.
  gc.collect(1)

  aside_dir = os.path.join(workdir, checkpoint.UNREADABLE_DIR)
  aside = sorted(int(name.split("-")[0]) for name in (
      os.listdir(aside_dir) if os.path.isdir(aside_dir) else []))
  must = [step for step in damaged if not pattern.startswith("state/ocdbt.process_0")
          and not (pattern in OPTIONAL and damages[step] == "deleted")]
  assert set(must) <= set(aside), (aside, caplog.text)
  for step in aside:  # each set aside with a warning naming it (and the file, when screened)
    assert f"Skipping checkpoint step {step} in {workdir}/checkpoints" in caplog.text
    assert "moved it to " + os.path.join(workdir, checkpoint.UNREADABLE_DIR) in caplog.text
    if pattern.startswith(("state/d", "state/manifest", "state/ocdbt")):
      assert "reading it fails" in caplog.text
    else:
      assert pattern.replace("/*", "/") in caplog.text
  readable = sorted(set(fingerprints) - set(aside))
  if readable:  # the newest readable step, and exactly its parameters
    state, _ = restored
    assert int(state.step) == readable[-1]
    assert checkpoint.fingerprint(state.params) == fingerprints[readable[-1]]
  else:
    assert restored is None and "No readable checkpoint" in caplog.text
    assert "starting from scratch" in caplog.text


@pytest.mark.slow
def test_a_read_only_reader_skips_a_damaged_step_without_moving_it(small_run, tmp_path, caplog):
  source, abstract, fingerprints = small_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  _damage(os.path.join(workdir, "checkpoints", "20"), "metrics/metrics", "truncated")
  reader = checkpoint.Checkpointer(workdir, read_only=True)  # Orbax reads metrics when built
  assert reader.steps() == [5, 10, 15] and reader.resolve_step("latest") == 15
  reader.close()
  assert "Skipping checkpoint step 20" in caplog.text and "metrics/metrics" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "20"))
  assert not os.path.exists(os.path.join(workdir, checkpoint.UNREADABLE_DIR))


# ---- A damaged config.json is rebuilt from the checkpoints ----------------------------------

@pytest.mark.parametrize("content", [b'{"batch_size": 3', b"", b"\xff\xfe garbage", b"[]"])
def test_a_damaged_config_json_is_rebuilt_from_the_newest_checkpoint(small_run, tmp_path, caplog,
                                                                     content):
  from research.config import command_line, workdir_config

  source, _, _ = small_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    good = json.load(f)
  with open(path, "wb") as f:
    f.write(content)
  config = command_line.parse_config(SMALL_RUN, "configs/default.py:smoke")
  workdir_config.check(config, workdir, allow_change=False)  # the same config
  assert "config.json cannot be read" in caplog.text and "checkpoint step 20" in caplog.text
  with open(path) as f:
    assert json.load(f) == good
  with open(path + ".unreadable", "rb") as f:
    assert f.read() == content  # the damaged file is kept
  changed = command_line.parse_config([*SMALL_RUN, "--config.seed=1"], "configs/default.py:smoke")
  with pytest.raises(UserError, match="seed: 0 in the workdir, 1 now"):
    workdir_config.check(changed, workdir, allow_change=False)


def test_a_damaged_config_json_without_checkpoints_is_a_clear_refusal(small_run, tmp_path):
  from research.config import command_line, workdir_config

  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_bytes(b'{"seed": ')
  config = command_line.parse_config([])
  with pytest.raises(UserError, match="no checkpoint in .* holds the config to rebuild it from"):
    workdir_config.check(config, str(workdir), allow_change=False)
  assert (workdir / "config.json").read_bytes() == b'{"seed": '


@pytest.mark.slow
def test_damaged_newest_step_and_config_json_the_run_resumes_and_rewrites_them(small_run,
                                                                               tmp_path):
  source, _, _ = small_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  _damage(os.path.join(workdir, "checkpoints", "20"), "_CHECKPOINT_METADATA", "truncated")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write('{"model": {"na')
  result = run_here(workdir, "--config=configs/default.py:smoke", *SMALL_RUN)
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "config.json cannot be read" in result.stderr
  assert "using the config stored in checkpoint step 15" in result.stderr
  assert "Skipping checkpoint step 20" in result.stderr
  assert "_CHECKPOINT_METADATA is damaged" in result.stderr
  assert "Resumed from checkpoint step 15" in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "15", "20", "5"]
  assert len(os.listdir(os.path.join(workdir, checkpoint.UNREADABLE_DIR))) == 1


@pytest.mark.slow
def test_eval_mode_with_a_damaged_config_json_uses_the_checkpoints_config(small_run, tmp_path):
  source, _, _ = small_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  with open(os.path.join(workdir, "config.json"), "wb") as f:
    f.write(b"\x00" * 100)
  result = run_here(workdir, "--mode=eval", "--config.eval.split=test[:100]")
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "using the config stored in checkpoint step 20" in result.stderr
  assert "Checkpoint step 20 on test[:100]" in result.stderr
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    assert f.read() == b"\x00" * 100  # eval only reads


# ---- init_from across architectures ----------------------------------------------------------

@pytest.mark.slow
def test_init_from_a_cnn_run_into_an_mlp_says_the_architectures_differ(small_run):
  import optax

  from research.run import train
  from research.models.mlp import MLP

  source, _, _ = small_run
  mlp = train.create_state(MLP(num_classes=10), optax.adam(1e-3), (28, 28, 1), 0)
  with pytest.raises(UserError) as error:
    checkpoint.initialize_from(mlp, source, num_classes=10, reinit_head=False)
  message = str(error.value)
  assert "the architectures differ" in message and "model.name='cnn'" in message
  assert "params/Conv_0/kernel: in " in message  # arrays of the source the MLP lacks
  assert "params/Dense_0/kernel: (1600, 64) in" in message  # and shapes that differ
  assert "init_reinit_head" not in message
