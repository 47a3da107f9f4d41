"""On-device augmentations: what they do to real images, and that they are reproducible."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from research import models
from research.data import augment, datasets
from research.run import steps, train


def _config(**fields):
  return ml_collections.ConfigDict(
      {"crop_padding": 0, "flip": False, "random_resized_crop": False, **fields})


def test_crop_with_padding_is_a_shifted_window_of_the_padded_image(fashion_mnist):
  images = jnp.asarray(fashion_mnist[1].images[:16], jnp.float32)
  out = np.asarray(augment.random_crop_with_padding(images, jax.random.key(0), padding=4))
  assert out.shape == images.shape
  padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
  offsets = set()
  for i in range(16):
    matches = [(dy, dx) for dy in range(9) for dx in range(9)
               if np.array_equal(padded[i, dy:dy + 28, dx:dx + 28], out[i])]
    assert matches, f"image {i} is not a window of its padded copy"
    offsets.add(matches[0])
  assert len(offsets) > 4  # offsets differ between images


@pytest.mark.slow
def test_flip_mirrors_about_half_of_the_images(fashion_mnist):
  images = jnp.asarray(fashion_mnist[1].images[:200], jnp.float32)
  out = np.asarray(augment.random_flip(images, jax.random.key(1)))
  flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) and not np.array_equal(o, i)
             for o, i in zip(out, images)]
  kept = [np.array_equal(o, i) for o, i in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 70 < sum(flipped) < 130


@pytest.mark.slow
def test_random_resized_crop_keeps_shape_and_range_and_full_crop_is_identity(fashion_mnist):
  images = jnp.asarray(fashion_mnist[1].images[:8], jnp.float32)
  out = augment.random_resized_crop(images, jax.random.key(2))
  assert out.shape == images.shape
  assert float(out.min()) >= -1e-3 and float(out.max()) <= 255 + 1e-3
  assert not np.allclose(out, images)
  whole = augment.random_resized_crop(images, jax.random.key(2), area=(1.0, 1.0), aspect=(1, 1))
  np.testing.assert_allclose(whole, images, atol=1e-3)


@pytest.mark.slow
def test_same_key_same_batch_other_step_other_batch(fashion_mnist):
  images = fashion_mnist[1].images[:32]
  train_input = jax.jit(augment.make_train_input(
      _config(crop_padding=2, flip=True, random_resized_crop=True)))
  a = train_input(images, jax.random.key(5))
  np.testing.assert_array_equal(a, train_input(images, jax.random.key(5)))
  assert not np.allclose(a, train_input(images, jax.random.key(6)))


def test_normalization_and_the_default_input_match_the_seed_preprocessing(fashion_mnist):
  images = fashion_mnist[1].images[:64]
  plain = augment.make_train_input(_config())(images, jax.random.key(0))
  np.testing.assert_array_equal(plain, steps.preprocess(images))
  np.testing.assert_array_equal(augment.make_eval_input()(images), steps.preprocess(images))
  mean, std = datasets.normalization("fashion_mnist")
  standardized = np.asarray(augment.make_eval_input(mean, std)(fashion_mnist[1].images[:20000]))
  assert abs(standardized.mean()) < 0.02 and abs(standardized.std() - 1) < 0.02


@pytest.mark.slow
def test_augmented_training_is_reproducible_step_by_step(fashion_mnist):
  """Resuming replays the same augmentations: they depend on (seed, step) only."""
  _, train_split, _ = fashion_mnist
  model = models.build(ml_collections.ConfigDict(
      {"name": "cnn", "conv_features": (4, 8), "dense_features": 16}), 10)
  tx = optax.sgd(0.05)
  run = jax.jit(functools.partial(
      steps.train_many, apply_fn=model.apply, tx=tx,
      train_input=augment.make_train_input(_config(crop_padding=2, flip=True))))
  indices = datasets.batch_indices(0, 0, 6, 16, len(train_split))
  start = train.create_state(model, tx, (28, 28, 1), seed=0)
  whole, _ = run(start, train_split.images, train_split.labels, indices)
  half, _ = run(start, train_split.images, train_split.labels, indices[:3])
  resumed, _ = run(half, train_split.images, train_split.labels, indices[3:])
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
