"""On-device input functions: uint8 batches -> augmented, normalized float32 batches.

They run inside the compiled train step, on the batch the step gathered, so the
host never touches pixels. All randomness comes from the key the step passes
in, itself `fold_in(state.rng, step)`: a run and its resumed copy augment every
image identically.

Augmentations (config.augment), applied in this order, each per example:
  random_resized_crop  a crop of 8%-100% of the area, aspect 3/4-4/3, resized back to
                       the input size (the Inception / ImageNet crop), for datasets in
                       memory; streamed datasets take it from the original image in the
                       input workers (research/data/image_crops.py) instead;
  crop_padding=p       zero-pad p pixels on every side, crop back at a random offset
                       (the CIFAR crop);
  flip                 mirror left-right with probability 1/2.
Then pixels are scaled to [0, 1] and, when the dataset's mean and std are
given, standardized per channel.
"""

import math

import jax
import jax.numpy as jnp


def to_float(images, mean=None, std=None):
  """uint8 pixels -> float32 in [0, 1], standardized when `mean`/`std` are given."""
  images = images.astype(jnp.float32) / 255.0
  if mean is not None:
    images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return images


def random_crop_with_padding(images, rng, padding: int):
  """Pads every side by `padding` zeros and cuts each image back at a random offset."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(rng, (n, 2), 0, 2 * padding + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(images, rng):
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def random_resized_crop(images, rng, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3)):
  """Inception-style crop, resized back to the input size (bilinear)."""
  n, h, w, c = images.shape
  area_rng, aspect_rng, y_rng, x_rng = jax.random.split(rng, 4)
  fraction = jax.random.uniform(area_rng, (n,), minval=area[0], maxval=area[1])
  log_aspect = jax.random.uniform(aspect_rng, (n,), minval=math.log(aspect[0]),
                                  maxval=math.log(aspect[1]))
  ratio = jnp.exp(log_aspect)  # width / height
  crop_h = jnp.clip(jnp.sqrt(fraction * h * w / ratio), 1.0, h)
  crop_w = jnp.clip(jnp.sqrt(fraction * h * w * ratio), 1.0, w)
  top = jax.random.uniform(y_rng, (n,)) * (h - crop_h)
  left = jax.random.uniform(x_rng, (n,)) * (w - crop_w)

  def resize(image, top, left, crop_h, crop_w):
    scale = jnp.stack([h / crop_h, w / crop_w])
    translation = -jnp.stack([top, left]) * scale
    return jax.image.scale_and_translate(image, (h, w, c), (0, 1), scale, translation,
                                         method="linear", antialias=True)

  return jax.vmap(resize)(images, top, left, crop_h, crop_w)


def make_train_input(augment_config, mean=None, std=None):
  """(uint8 images, key) -> float32 images, with the augmentations `augment_config` turns on."""
  padding = int(augment_config.crop_padding)
  flip = bool(augment_config.flip)
  resized_crop = bool(augment_config.random_resized_crop)

  def train_input(images, rng):
    crop_rng, pad_rng, flip_rng = jax.random.split(rng, 3)
    images = images.astype(jnp.float32)
    if resized_crop:
      images = random_resized_crop(images, crop_rng)
    if padding:
      images = random_crop_with_padding(images, pad_rng, padding)
    if flip:
      images = random_flip(images, flip_rng)
    return to_float(images, mean, std)

  return train_input


def make_eval_input(mean=None, std=None):
  return lambda images: to_float(images, mean, std)
