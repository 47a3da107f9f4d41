"""The ImageNet crops of streamed datasets (research/data/image_crops.py) against references.

A generated JPEG of known layout (a smooth colour ramp, 500 x 375 like an ImageNet
photograph): training crops stay inside it and together cover all of it, with the
Inception crop's area and aspect ranges; the evaluation crop (shorter side to
size / 0.875, centre square) equals a plain resize-then-crop within one grey level;
the DCT-scaled decode of a small box stays close to a full decode of that box.
"""

import io

import numpy as np
import pytest
from PIL import Image

from research.data import datasets, image_crops

HEIGHT, WIDTH = 375, 500


@pytest.fixture(scope="module")
def ramp_jpeg():
  y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
  pixels = np.stack([x * 255 // (WIDTH - 1), y * 255 // (HEIGHT - 1),
                     (x + y) * 255 // (WIDTH + HEIGHT - 2)], -1).astype(np.uint8)
  encoded = io.BytesIO()
  Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
  return encoded.getvalue()


def _full_decode(encoded):
  return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


@pytest.mark.parametrize("height,width", [(HEIGHT, WIDTH), (48, 64), (64, 40)])
def test_training_crops_stay_inside_and_cover_the_whole_image(height, width):
  """Boxes of the photograph's shape (corners are reached by few of them, so 20,000
  draws), of a small image, and of a portrait one."""
  HEIGHT, WIDTH = height, width  # noqa: N806 (the module's names, for this shape)
  rng = np.random.default_rng(0)
  covered = np.zeros((HEIGHT, WIDTH), bool)
  fallbacks = 0
  for _ in range(20000):
    top, left, height, width = image_crops.inception_box(rng, HEIGHT, WIDTH)
    assert 0 <= top and 0 <= left and top + height <= HEIGHT and left + width <= WIDTH
    area = height * width / (HEIGHT * WIDTH)
    if (top, left, height, width) == image_crops.centre_box(HEIGHT, WIDTH):
      fallbacks += 1
      continue
    # Within the ranges, up to the rounding of each side to whole pixels.
    assert (height + 0.5) * (width + 0.5) >= 0.08 * HEIGHT * WIDTH and area <= 1.0
    assert (width + 0.5) / (height - 0.5) >= 3 / 4 and (width - 0.5) / (height + 0.5) <= 4 / 3
    covered[int(top):int(top + height), int(left):int(left + width)] = True
  assert covered.all()
  assert fallbacks < 200  # 10 attempts rarely all fail at these aspects


def test_inception_crop_falls_back_to_the_centre_crop_when_nothing_fits():
  # A 1 x 50 strip: no box of aspect 3/4..4/3 and area >= 50% fits.
  box = image_crops.inception_box(np.random.default_rng(0), 1, 50, area_range=(0.5, 1.0))
  assert box == image_crops.centre_box(1, 50)


def test_training_crop_decodes_the_box_of_the_original(ramp_jpeg):
  """A random crop, decoded at a DCT scale, against the same box cut from a full decode
  and resized: the same region, within the few grey levels DCT scaling costs."""
  rng = np.random.default_rng(3)
  full = Image.fromarray(_full_decode(ramp_jpeg))
  for _ in range(5):
    box = image_crops.inception_box(rng, HEIGHT, WIDTH)
    top, left, height, width = box
    crop = image_crops.decode_box(ramp_jpeg, box, 32, 3)
    reference = np.asarray(full.resize((32, 32), Image.BILINEAR,
                                       box=(left, top, left + width, top + height)))
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - reference).max() <= 4


@pytest.mark.parametrize("size,tolerance", [(224, 1), (64, 3)])
def test_eval_crop_equals_resize_then_centre_crop(ramp_jpeg, size, tolerance):
  """Shorter side to size / 0.875 (256 for 224), then the centre square: within one grey
  level at 224; at 64 (a quarter-scale DCT decode) within `tolerance`."""
  box = image_crops.centre_box(HEIGHT, WIDTH, 0.875, size)
  crop = image_crops.decode_box(ramp_jpeg, box, size, 3)
  resized = datasets.resize_and_centre_crop(_full_decode(ramp_jpeg), round(size / 0.875))
  offset = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
  reference = resized[offset[0]:offset[0] + size, offset[1]:offset[1] + size]
  assert crop.shape == reference.shape == (size, size, 3)
  assert np.abs(crop.astype(int) - reference).max() <= tolerance


def test_crop_fraction_sets_the_resized_shorter_side():
  # 375 x 500 -> 256 x 341, whose centre 224 square starts at (16, 58).
  assert image_crops.centre_box(375, 500, 0.875, 224) == pytest.approx(
      (16 * 375 / 256, 58 * 500 / 341, 224 * 375 / 256, 224 * 500 / 341))
  top, _, height, _ = image_crops.centre_box(375, 500, 1.0, 224)
  assert (top, height) == (0, 375)  # no margin: the whole shorter side


def test_greyscale_and_png_images_decode_to_the_dataset_channels():
  grey = io.BytesIO()
  Image.fromarray(np.full((40, 60), 128, np.uint8)).save(grey, format="JPEG")
  image = image_crops.decode_box(grey.getvalue(), (0, 0, 40, 40), 16, 3)
  assert image.shape == (16, 16, 3) and np.abs(image.astype(int) - 128).max() <= 1
  png = io.BytesIO()
  Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(png, format="PNG")
  np.testing.assert_array_equal(image_crops.decode_whole(png.getvalue(), 1)[..., 0],
                                np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
