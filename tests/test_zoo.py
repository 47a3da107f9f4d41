"""The model zoo: names and knobs, bfloat16 compute, other shapes, BatchNorm statistics.

Every model's few training steps on real Fashion-MNIST are in test_zoo_training.py and
test_zoo_resnets.py (files of their own, so that `make test`'s workers run them side by
side); they use this file's SMALL_KNOBS and helpers.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import with_fast_compile
from research import models
from research.data import datasets
from research.errors import UserError
from research.run import steps, train

# Each entry's own smoke knobs (research/models/__init__.py) keep compile and step times to
# seconds; the structure is the real one. A new model is covered without editing this file.
SMALL_KNOBS = {name: entry.smoke for name, entry in models.MODELS.items()}


def _model(name, **knobs):
  return models.build(ml_collections.ConfigDict({"name": name, **knobs}), num_classes=10)


# These tests check what a model computes, not how fast: XLA's cheapest optimisation level
# compiles a small ResNet in about half the time, to the same arithmetic up to rounding.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def _quick_jit(function, *args):
  """`jax.jit(function)(*args)`, compiled at QUICK_COMPILE."""
  return jax.jit(function).lower(*args).compile(QUICK_COMPILE)(*args)


def _train(model, train_split, num_steps=3, batch_size=16, tx=None):
  tx = tx or optax.adam(1e-3)
  # One compiled program for the initial state, not one per operation of model.init.
  state = _quick_jit(lambda: train.create_state(model, tx, (28, 28, 1), seed=0))
  run = functools.partial(steps.train_many, apply_fn=model.apply, tx=tx)
  indices = datasets.batch_indices(0, 0, num_steps, batch_size, len(train_split))
  return state, _quick_jit(run, state, train_split.images, train_split.labels, indices)


def test_every_models_smoke_knobs_are_its_own_declared_knobs():
  for name, entry in models.MODELS.items():
    assert set(entry.smoke) <= set(entry.knobs), name
    assert set(models.defaults(name)) == set(entry.knobs), name


@pytest.mark.parametrize("name", ["resnet8", "vit_ti"])
@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(fashion_mnist, name):
  _, train_split, _ = fashion_mnist
  model = _model(name, **SMALL_KNOBS[name], dtype="bfloat16")
  _, (state, metrics) = _train(model, train_split, num_steps=2)
  assert np.all(np.isfinite(metrics["loss"]))
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  logits = _quick_jit(lambda: model.apply({"params": state.params, **state.model_state},
                                          jnp.zeros((1, 28, 28, 1))))
  assert logits.dtype == jnp.float32


@pytest.mark.slow
def test_models_run_on_other_input_shapes_and_class_counts():
  for name, shape in [("resnet8", (40, 40, 3)), ("vit_ti", (30, 30, 3)), ("mlp", (32, 32, 3))]:
    model = models.build(ml_collections.ConfigDict({"name": name, **SMALL_KNOBS[name]}), 7)
    # Compiled whole: run op by op, these three models took 98 s at load 4.
    variables = _quick_jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))
    assert _quick_jit(lambda: model.apply(variables, jnp.zeros((2, *shape)))).shape == (2, 7)


@pytest.mark.slow
def test_batchnorm_statistics_update_in_training_and_stay_frozen_in_evaluation(fashion_mnist):
  _, train_split, test_split = fashion_mnist
  model = _model("resnet8", width=4)
  initial, (state, _) = _train(model, train_split, num_steps=2)
  before = jax.tree.leaves(initial.model_state["batch_stats"])
  after = jax.tree.leaves(state.model_state["batch_stats"])
  assert all(not np.allclose(a, b) for a, b in zip(before, after))  # training moved them

  evaluate = jax.jit(functools.partial(steps.eval_step, apply_fn=model.apply))
  images, labels = test_split.images[:64], test_split.labels[:64]
  mask = np.ones(64, np.float32)
  first = evaluate(state.params, state.model_state, images, labels, mask)
  # Evaluation uses the running averages: per-example outputs do not depend on
  # the rest of the batch, and applying in eval mode mutates nothing.
  variables = {"params": state.params, **state.model_state}
  # One compiled program (op by op, a ResNet's eval is hundreds of small compiles).
  whole, alone, (_, mutated) = _quick_jit(lambda: (
      model.apply(variables, steps.preprocess(images), train=False),
      model.apply(variables, steps.preprocess(images[:3]), train=False),
      model.apply(variables, steps.preprocess(images), train=False, mutable=["batch_stats"])))
  np.testing.assert_allclose(whole[:3], alone, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(mutated), jax.tree.leaves(state.model_state)):
    np.testing.assert_array_equal(a, b)
  again = evaluate(state.params, state.model_state, images, labels, mask)
  assert float(first["loss"]["loss_sum"]) == float(again["loss"]["loss_sum"])
  # ...and they matter: other statistics give other evaluation results.
  shifted = jax.tree.map(lambda x: x + 1.0, state.model_state)
  assert float(evaluate(state.params, shifted, images, labels, mask)["loss"]["loss_sum"]) != float(
      first["loss"]["loss_sum"])


_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import functools, jax, numpy as np, optax, ml_collections
    from research import mesh as mesh_lib, models
    from research.run import steps, train
    assert jax.device_count() == 2
    model = models.build(ml_collections.ConfigDict({"name": "resnet8", "width": 4}), 10)
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (8,)).astype(np.int32)
    step = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx))
    state = jax.jit(lambda: train.create_state(model, tx, (28, 28, 1), 0))()  # not op by op
    mesh = mesh_lib.make_mesh()
    sharded, _ = step(state, mesh_lib.global_batch(images, mesh), mesh_lib.global_batch(labels, mesh))
    with jax.default_device(jax.devices()[0]):
      single, _ = step(state, images, labels)
    stats = lambda s: jax.tree.leaves(jax.device_get(s.model_state))
    for a, b in zip(stats(sharded), stats(single)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)), jax.tree.leaves(single.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print("BATCHNORM_GLOBAL_OK")
""")


@pytest.mark.slow
def test_batchnorm_statistics_are_global_over_a_data_sharded_batch():
  """On 2 devices each holding half the batch, BatchNorm sees the whole batch."""
  # Both steps compiled alike and compared within tolerances: XLA's cheaper optimization.
  env = with_fast_compile({**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                           "JAX_PLATFORMS": "cpu"})
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
  assert "BATCHNORM_GLOBAL_OK" in result.stdout, result.stderr[-3000:]


def test_unknown_model_lists_the_zoo():
  with pytest.raises(UserError, match="Known models: cnn, mlp, resnet8"):
    _model("resnet99")


def test_knob_of_another_model_fails_with_the_valid_knobs():
  with pytest.raises(UserError, match=r"model.depth does not apply to model 'resnet20'; its "
                     r"knobs are: width, stem, conv_impl, dtype"):
    _model("resnet20", depth=18)
  with pytest.raises(UserError, match="dtype='float16' is not accepted: one of 'float32'"):
    _model("mlp", dtype="float16")
  with pytest.raises(UserError, match="6n\\+4"):
    _model("wide_resnet", depth=12)


@pytest.mark.parametrize("name", sorted(SMALL_KNOBS))
def test_defaults_are_the_knobs_build_accepts(name):
  knobs = models.defaults(name)
  assert set(knobs) == set(models.MODELS[name].knobs)
  _model(name, **knobs)  # builds without complaint


def test_config_argument_puts_a_models_knobs_on_the_command_line():
  from configs import default

  config = default.get_config("model=wide_resnet")
  assert config.model.to_dict() == {"name": "wide_resnet", "depth": 16, "width": 4,
                                    "dropout_rate": 0.0, "conv_impl": "auto",
                                    "dtype": "float32", "bn_sync": "global"}
  config.model.depth = 28  # what --config.model.depth=28 does on a locked config
  config.lock()
  with pytest.raises(AttributeError):
    config.model.depht = 3


@pytest.mark.slow
def test_bad_names_and_knobs_fail_before_any_work(tmp_path):
  from conftest import run_here

  for flag, expected in [("--config.model.name=resnet99", "one of 'cnn', 'mlp'"),
                         ("--config.optimizer.name=adagrad", "one of 'sgd', 'momentum'"),
                         ("--config.schedule.name=linear", "one of 'constant', 'cosine'"),
                         ("--config.dataset.name=no_such_set", "not a TFDS dataset")]:
    workdir = tmp_path / flag.split("=")[0].rsplit(".", 1)[-1]
    result = run_here(str(workdir), "--config=configs/default.py", flag)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not workdir.exists()
