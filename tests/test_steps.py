import functools

import jax
import numpy as np
import optax
import pytest

from research import data, steps, train
from research.models.cnn import CNN


def _state(model, tx):
  return train.create_state(model, tx, (28, 28, 1), seed=0)


def test_loss_falls_over_a_few_steps_on_real_batches(fashion_mnist):
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.adam(1e-3)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))
  indices = data.batch_indices(0, 0, 60, 32, len(train_split))
  state, metrics = run(_state(model, tx), train_split.images, train_split.labels, indices)
  losses = np.asarray(metrics["loss"])
  assert int(state.step) == 60
  assert losses[-10:].mean() < 0.7 * losses[:10].mean()


def test_train_many_equals_single_steps(fashion_mnist):
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.adam(1e-3)
  indices = data.batch_indices(0, 0, 4, 32, len(train_split))
  many, _ = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))(
      _state(model, tx), train_split.images, train_split.labels, indices)
  one = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx))
  state = _state(model, tx)
  for row in indices:
    state, _ = one(state, train_split.images[row], train_split.labels[row])
  for a, b in zip(jax.tree.leaves(many.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_compiled_loop_runs_chunks_of_any_length(fashion_mnist):
  # Chunks cut at stops that do not line up (log every 469 steps, eval every 937) have
  # many lengths; each ran as its own compiled program, ~2 s of compiling apiece.
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.adam(1e-3)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))
  indices = data.batch_indices(0, 0, 5, 32, len(train_split))
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
def test_evaluation_counts_every_test_example_once(fashion_mnist, batch_size):
  _, _, test_split = fashion_mnist
  model = CNN(num_classes=10)
  state = _state(model, optax.adam(1e-3))
  evaluate = jax.jit(functools.partial(steps.evaluate_all, apply_fn=model.apply))
  totals = evaluate(state.params, state.model_state, *data.padded_for_eval(test_split, batch_size))
  assert float(totals["count"]) == 10000
  # The same totals as one unpadded pass over the whole split.
  logits = model.apply({"params": state.params}, steps.preprocess(test_split.images))
  correct = int(np.sum(np.argmax(logits, -1) == test_split.labels))
  assert int(totals["correct"]) == correct


def test_microbatched_step_matches_one_whole_batch(fashion_mnist):
  _, train_split, _ = fashion_mnist
  model, tx = CNN(num_classes=10), optax.sgd(0.1)
  row = data.batch_indices(0, 0, 1, 64, len(train_split))[0]
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
