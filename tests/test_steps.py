import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import models
from research.data import datasets
from research.models.cnn import CNN
from research.run import steps, train


def _state(model, tx):
  return train.create_state(model, tx, (28, 28, 1), seed=0)


@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compile-bound
@pytest.mark.slow
def test_loss_falls_over_a_few_steps_on_real_batches(fashion_mnist):
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.adam(1e-3)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))
  indices = datasets.batch_indices(0, 0, 60, 32, len(train_split))
  state, metrics = run(_state(model, tx), train_split.images, train_split.labels, indices)
  losses = np.asarray(metrics["loss"])
  assert int(state.step) == 60
  assert losses[-10:].mean() < 0.7 * losses[:10].mean()


@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compile-bound
@pytest.mark.slow
def test_train_many_equals_single_steps(fashion_mnist):
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.adam(1e-3)
  indices = datasets.batch_indices(0, 0, 4, 32, len(train_split))
  many, _ = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))(
      _state(model, tx), train_split.images, train_split.labels, indices)
  one = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx))
  state = _state(model, tx)
  for row in indices:
    state, _ = one(state, train_split.images[row], train_split.labels[row])
  for a, b in zip(jax.tree.leaves(many.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_compiled_loop_runs_chunks_of_any_length(fashion_mnist):
  # Chunks cut at stops that do not line up (log every 469 steps, eval every 937) have
  # many lengths; each ran as its own compiled program, ~2 s of compiling apiece.
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.adam(1e-3)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))
  indices = datasets.batch_indices(0, 0, 5, 32, len(train_split))
  state = _state(model, tx)
  for count in (3, 2):  # steps 0-2, then 3-4, through 5 rows with the rest unused
    rows = np.pad(indices[int(state.step):int(state.step) + count], ((0, 5 - count), (0, 0)))
    state, metrics = run(state, train_split.images, train_split.labels, rows, count)
    assert np.all(np.asarray(metrics["loss"])[:count] > 0)
    assert not np.any(np.asarray(metrics["loss"])[count:])
  whole, _ = run(_state(model, tx), train_split.images, train_split.labels, indices, 5)
  assert run._cache_size() == 1
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch_size", [1000, 768, 7])
@pytest.mark.slow
def test_evaluation_counts_every_test_example_once(fashion_mnist, batch_size):
  # 2,003 real examples: the last batch is partial at each of these batch sizes.
  test_split = datasets.Split(fashion_mnist[2].images[:2003], fashion_mnist[2].labels[:2003])
  model = CNN(num_classes=10)
  state = _state(model, optax.adam(1e-3))
  evaluate = jax.jit(functools.partial(steps.evaluate_all, apply_fn=model.apply))
  totals = evaluate(state.params, state.model_state, *datasets.padded_for_eval(test_split, batch_size))
  assert float(totals["count"]) == 2003
  # The same totals as one unpadded pass over the whole split.
  logits = model.apply({"params": state.params}, steps.preprocess(test_split.images))
  correct = int(np.sum(np.argmax(logits, -1) == test_split.labels))
  assert int(totals["accuracy"]["correct"]) == correct


@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: compile-bound
@pytest.mark.slow
def test_microbatched_step_matches_one_whole_batch(fashion_mnist):
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.sgd(0.1)
  row = datasets.batch_indices(0, 0, 1, 64, len(train_split))[0]
  images, labels = train_split.images[row], train_split.labels[row]
  results = []
  for microbatches in (1, 4):
    step = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx,
                                     microbatches=microbatches))
    results.append(step(_state(model, tx), images, labels))
  (whole, whole_metrics), (split, split_metrics) = results
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(whole_metrics["loss"], split_metrics["loss"], rtol=1e-5)
  assert float(whole_metrics["accuracy"]) == float(split_metrics["accuracy"])


class _DropoutProbe(nn.Module):
  """Logits = Dense(dropout(ones)) with a zero kernel: the kernel's gradient row j is
  (softmax(0) - onehot) / (1 - rate) times the number of examples whose mask kept j."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(0.5, deterministic=not train)(jnp.ones((x.shape[0], 64)))
    return nn.Dense(10, use_bias=False, kernel_init=nn.initializers.zeros)(x)


@pytest.mark.slow
def test_each_micro_batch_draws_its_own_dropout_masks():
  model, tx = _DropoutProbe(), optax.sgd(1.0)
  images = np.zeros((4, 28, 28, 1), np.uint8)
  labels = np.zeros((4,), np.int32)
  step = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx,
                                   microbatches=4))
  state, _ = step(_state(model, tx), images, labels)
  # Summed over the 4 micro-batches of one example each, divided by 4 (their mean):
  # column 1 (a wrong class) of the gradient is 0.1 * 2 * (masks keeping row j) / 4, and
  # SGD with step 1 moved the zero kernel by minus that.
  kept = np.round(-np.asarray(state.params["Dense_0"]["kernel"])[:, 1] / (0.1 * 2 / 4))
  assert set(np.unique(kept)) <= {0, 1, 2, 3, 4}
  # One shared mask would keep each row in all four slices or in none.
  assert np.any((kept > 0) & (kept < 4)), kept


@pytest.mark.slow
def test_a_step_without_micro_batches_is_unchanged_by_per_micro_batch_keys(fashion_mnist):
  """The whole batch still draws its dropout masks from the step key itself, as it did
  before micro-batches got keys of their own: the same parameters up to the
  float rounding of two compiled programs (another mask moves them far more)."""
  _, train_split, _ = fashion_mnist
  model = models.build(ml_collections.ConfigDict(
      {"name": "mlp", "hidden_features": (32,), "dropout_rate": 0.5}), 10)
  tx = optax.sgd(0.1)
  row = datasets.batch_indices(0, 0, 1, 32, len(train_split))[0]
  images, labels = train_split.images[row], train_split.labels[row]
  state = _state(model, tx)
  new_state, _ = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx))(
      state, images, labels)

  def before_the_change(state):  # train_step's gradient as written before, key and all
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss(params):
      logits = model.apply({"params": params}, steps.preprocess(images), train=True,
                           rngs={"dropout": step_rng})
      return steps.cross_entropy(logits, labels).mean()

    updates, _ = tx.update(jax.grad(loss)(state.params), state.opt_state, state.params)
    return optax.apply_updates(state.params, updates)

  expected = jax.jit(before_the_change)(state)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
