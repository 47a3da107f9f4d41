"""User mistakes end in one clear message, exit status 2, no traceback, nothing written.

Flag mistakes are parsed in-process as `research.main` parses them (its flags and
`command_line.parse`), and a few run `python -m research.main` as a user would;
impossible values are checked through `command_line.parse_config`, the parser main uses,
and mistakes found once the config is parsed through `run_here` (what main then runs).
"""

import json
import os
import re
import sys

import pytest

from conftest import parse_as_main, run_here, run_main, tree_digest
from research.config import command_line, config_validation, workdir_config
from research.errors import UserError

SMOKE = "--config=configs/default.py:smoke"


def _refused(result, workdir, *fragments, status=2):
  """The run exited with `status` and an `error:` line holding every fragment."""
  assert result.returncode == status, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  message = result.stderr[result.stderr.index("error: "):]
  for fragment in fragments:
    assert fragment in message, message
  assert not os.path.exists(workdir), os.listdir(workdir)
  return message


@pytest.mark.parametrize("flags, fragments", [
    # ml_collections raises a KeyError traceback for these; absl exits 1 for the others.
    (["--config.optimzer.lr=0.1"], ["--config.optimzer.lr='0.1'", "no field 'optimzer'",
                                    "Did you mean --config.optimizer?"]),
    (["--config.optimizer.lr=0.1"], ["config.optimizer has no field 'lr'",
                                     "Its fields: grad_accum_steps, grad_clip_norm, learning_rate, name"]),
    (["--config.optimizer.learning_rate=fast"], ["--config.optimizer.learning_rate='fast'",
                                                 "a number", "0.001"]),
    (["--config.batch_size=1.5"], ["--config.batch_size='1.5'", "an integer"]),
    (["--config.shard_params=maybe"], ["--config.shard_params='maybe'", "true or false"]),
    (["--config.optimizer=0.1"], ["optimizer is a group of fields (grad_accum_steps, grad_clip_norm, learning_rate"]),
    (["--config.seed.value=1"], ["seed is a single value (0)"]),
    (["--bogus_flag=1"], ["--bogus_flag is not a flag", "--workdir", "--config.FIELD=VALUE"]),
    (["--mode=fit"], ["--mode='fit' is not accepted: one of train, eval"]),
    (["--config=configs/nope.py"], ["no file 'configs/nope.py'", "default.py"]),
    (["--config=configs/default.py:tiny"], ["Unknown config argument 'tiny'",
                                            "'smoke', 'model=NAME'"]),
    (["--config.seed=1", SMOKE], ["before a value for --config"]),
])
def test_flag_mistakes_name_the_flag_the_value_and_what_is_accepted(tmp_path, flags, fragments):
  # The parse research.main runs (its own flags, command_line.parse), in this process; the
  # program's one line and exit status for such a mistake: the test below.
  workdir = str(tmp_path / "run")
  with pytest.raises(UserError) as error:
    parse_as_main([sys.executable, "-m", "research.main", f"--workdir={workdir}", *flags])
  for fragment in fragments:
    assert fragment in str(error.value), str(error.value)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("flags, fragments", [
    (["--config.optimzer.lr=0.1"], ["--config.optimzer.lr='0.1'", "no field 'optimzer'"]),
    (["positional"], ["Unexpected arguments: positional"]),  # found by main after the parse
])
@pytest.mark.slow
def test_a_flag_mistake_ends_the_program_with_one_line_and_exit_2(tmp_path, flags, fragments):
  workdir = str(tmp_path / "run")
  _refused(run_main(workdir, *flags), workdir, *fragments)


@pytest.mark.slow
def test_verbose_shows_the_traceback_of_a_flag_mistake(tmp_path):
  result = run_main(str(tmp_path / "run"), "--verbose", "--config.optimzer.lr=0.1")
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "no field 'optimzer'" in result.stderr


@pytest.mark.parametrize("override, field, accepted", [
    ("--config.optimizer.learning_rate=-0.1", "optimizer.learning_rate", "a finite number > 0"),
    ("--config.optimizer.learning_rate=inf", "optimizer.learning_rate", "a finite number > 0"),
    ("--config.num_epochs=0", "num_epochs", "a positive number"),
    ("--config.batch_size=0", "batch_size", "an integer from 1 to"),
    ("--config.eval_batch_size=-5", "eval_batch_size", "an integer from 1 to"),
    ("--config.seed=-1", "seed", "from 0 to"),
    ("--config.log_every_steps=0", "log_every_steps", "an integer from 1 to"),
    ("--config.best_metric=f1", "best_metric", "one of 'loss', 'accuracy'"),
    ("--config.profile_steps=5", "profile_steps", "START,COUNT"),
    ("--config.eval.checkpoint_step=newest", "eval.checkpoint_step", "'latest', 'best'"),
    ("--config.dataset.reader_threads=-2", "dataset.reader_threads", "an integer from 0 to 32"),
    # Found by hand (issue 20): a traceback inside the resize before the table existed.
    ("--config.dataset.image_size=-5", "dataset.image_size", "an integer from 0 to 8192"),
    ("--config.label_smoothing=nan", "label_smoothing", "a finite number in [0, 1)"),
    ("--config.optimizer.grad_accum_steps=0", "optimizer.grad_accum_steps", "an integer from 1"),
    ("--config.model.name=resnet9000", "model.name", "one of 'cnn', 'mlp'"),
    ("--config.optimizer.name=adamax", "optimizer.name", "one of 'sgd', 'momentum', 'adam'"),
    # Found by test_properties: a string here used to fail inside round().
    ("--config.schedule.boundaries_epochs=true", "schedule.boundaries_epochs",
     "a tuple of finite numbers"),
    ("--config.schedule.boundaries_steps=(5, -1)", "schedule.boundaries_steps",
     "a tuple of integers, each from 0"),
    # Found by test_properties: NaN and infinity used to fail inside int().
    ("--config.schedule.boundaries_epochs=(3, inf)", "schedule.boundaries_epochs",
     "a tuple of finite numbers"),
    ("--config.schedule.warmup_epochs=nan", "schedule.warmup_epochs", "a finite number in [0,"),
    ("--config.schedule.warmup_epochs=inf", "schedule.warmup_epochs", "a finite number in [0,"),
    ("--config.schedule.warmup_steps=-3", "schedule.warmup_steps", "an integer from 0 to"),
])
def test_impossible_values_are_refused_with_field_value_and_accepted(override, field, accepted):
  config = command_line.parse_config([override])
  with pytest.raises(UserError) as error:
    config_validation.validate(config)
  message = str(error.value)
  assert field in message and accepted in message
  assert override.split("=", 1)[1] in message  # the value given


@pytest.mark.slow
def test_zero_epochs_fails_before_anything_is_written(tmp_path):
  workdir = str(tmp_path / "run")
  _refused(run_here(workdir, SMOKE, "--config.num_epochs=0", "--config.num_train_steps=0"),
           workdir, "--config.num_epochs=0", "a positive number")


@pytest.mark.slow
def test_batch_not_divisible_by_the_device_count(tmp_path):
  workdir = str(tmp_path / "run")
  result = run_main(workdir, SMOKE, "--config.batch_size=33",
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  _refused(result, workdir, "--config.batch_size=33", "multiple of 2", "32 or 34")


@pytest.mark.slow
def test_image_size_the_model_cannot_take(tmp_path):
  # Four valid 3x3 convolutions with 2x2 pooling take 28x28 down to nothing.
  config_file = tmp_path / "deep.py"
  config_file.write_text(
      "from configs import default\n\n"
      "def get_config():\n"
      "  config = default.get_config('smoke')\n"
      "  config.model.conv_features = (32, 64, 128, 256)\n"
      "  return config\n")
  workdir = str(tmp_path / "run")
  result = run_here(workdir, f"--config={config_file}")
  _refused(result, workdir, "model.name='cnn'", "model.conv_features=(32, 64, 128, 256)",
           "cannot take images of shape (28, 28, 1)")


def test_validation_builds_nothing_and_still_refuses_what_the_builders_refuse(monkeypatch):
  # The run builds the model and the optimizer once; validation only checks their settings.
  from research import models
  from research.run import optim

  def build(*args, **kwargs):
    raise AssertionError("validation built a model or an optimizer")

  monkeypatch.setattr(models, "build", build)
  monkeypatch.setattr(optim, "build_optimizer", build)
  checked = config_validation.validate(command_line.parse_config([]))
  assert checked.config.model.name == "cnn"
  wide = command_line.parse_config(["--config.model.depth=12"],
                                   "configs/default.py:model=wide_resnet")
  with pytest.raises(UserError, match=r"model.depth=12 is not accepted for wide_resnet: use 6n\+4"):
    config_validation.validate(wide)


def test_training_takes_a_validated_config_only(tmp_path):
  from research.run import train

  with pytest.raises(TypeError, match=r"takes config_validation.validate\(config\), not a config"):
    train.train_and_evaluate(command_line.parse_config([]), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # refused before the lock creates the workdir


def test_attention_heads_that_do_not_divide_the_width():
  # flax asserts this one (an AssertionError, not a shape error): still one clear line.
  import jax
  import jax.numpy as jnp
  import ml_collections

  from research import models
  from research.errors import UserError

  model_config = ml_collections.ConfigDict({**models.defaults("vit_ti"), "name": "vit_ti",
                                            "num_heads": 5})
  model = models.build(model_config, 10)
  with pytest.raises(UserError, match=r"num_heads=5.*divisible by number of heads \(5\)"):
    models.check_fits(model_config, (32, 32, 3), lambda: jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)))


@pytest.mark.slow
def test_eval_batch_larger_than_the_eval_split(tmp_path):
  workdir = str(tmp_path / "run")
  result = run_here(workdir, SMOKE, "--config.eval_batch_size=2000")
  _refused(result, workdir, "--config.eval_batch_size=2000", "at most 1000")  # test[:1000]


@pytest.mark.slow
def test_empty_split_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  result = run_here(workdir, SMOKE, "--config.dataset.eval_split=test[:0]")
  _refused(result, workdir, "'test[:0]'", "Accepted:")


@pytest.mark.slow
def test_dataset_missing_offline_names_the_ways_to_get_it(tmp_path):
  # mnist has no local source files here; RESEARCH_OFFLINE forbids a download.
  workdir = str(tmp_path / "run")
  result = run_main(workdir, SMOKE, "--config.dataset.name=mnist",
                    env={"RESEARCH_OFFLINE": "1", "TFDS_DATA_DIR": str(tmp_path / "tfds")})
  message = _refused(result, workdir, "Dataset mnist is not available offline",
                     "put an already prepared copy in", "TFDS_DATA_DIR",
                     "python -m research.prepare_data --dataset=mnist")
  assert message.count("\n- ") >= 2  # one line per way


@pytest.mark.parametrize("name, fragment", [
    ("mnist:1.0.0", "cannot be loaded at version 1.0.0"),
    ("bad name", "NAME[/CONFIG][:VERSION]"),
    ("no_such_dataset", "is not a TFDS dataset"),
])
def test_malformed_dataset_names(tmp_path, name, fragment):
  from research.data import prepare_data

  with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
    prepare_data.builder_for(name, str(tmp_path))


def test_stored_config_differs_lists_the_fields_and_needs_explicit_consent(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  stored = command_line.parse_config([])
  (workdir / "config.json").write_text(stored.to_json_best_effort())
  changed = command_line.parse_config(["--config.batch_size=64",
                                       "--config.optimizer.learning_rate=0.01"])
  with pytest.raises(UserError) as error:
    workdir_config.check(changed, str(workdir), allow_change=False)
  message = str(error.value)
  assert "batch_size: 32 in the workdir, 64 now" in message
  assert "optimizer.learning_rate: 0.001 in the workdir, 0.01 now" in message
  assert "--allow_config_change" in message and "seed" not in message
  workdir_config.check(changed, str(workdir), allow_change=True)
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == 32
  # How many threads read a streamed dataset changes nothing computed: no consent needed.
  threads = command_line.parse_config(["--config.dataset.reader_threads=3"])
  workdir_config.check(threads, str(workdir), allow_change=False)


@pytest.mark.slow
def test_non_finite_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  good = run_here(workdir, SMOKE, "--config.num_train_steps=50")
  assert good.returncode == 0, good.stderr[-3000:]
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  before = tree_digest(checkpoint_dir)

  exploding = run_here(workdir, SMOKE, "--config.num_train_steps=100", "--allow_config_change",
                       "--config.optimizer.learning_rate=1e30")
  assert exploding.returncode == 1, exploding.stderr[-3000:]
  assert "Traceback" not in exploding.stderr
  message = exploding.stderr[exploding.stderr.index("error: "):]
  # Step 51 or 52, the first updates after the good run's 50: they explode at once.
  stopped_at = re.search(r"became non-finite at step (\d+)\. ", message)
  assert stopped_at and int(stopped_at.group(1)) in (51, 52), message
  assert "The last good checkpoint (step 50) is untouched" in message
  assert tree_digest(checkpoint_dir) == before
  assert not os.path.exists(os.path.join(workdir, "run.lock"))
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["status"] == "failed"

