"""Decoding one stored image into the crop the model sees (streamed datasets only).

Runs per example inside the input workers (research/data/stream_examples.py); imports no
JAX. The geometry is the standard ImageNet one (Szegedy et al.; the Flax ImageNet
example; big_vision's `decode_jpeg_and_inception_crop`), taken from the ORIGINAL
image, never from a resized copy:

  training    the Inception crop: up to ATTEMPTS boxes of area_range of the image's area
              and aspect (width / height) log-uniform in ASPECT_RANGE; the first that
              fits is taken at a uniform position, else the evaluation crop (the
              references' fallback); the box is resized to image_size (bilinear,
              antialiased). The flip stays on the device (research/data/augment.py).
  evaluation  the shorter side resized to image_size / crop_fraction (0.875: 256 for
              224), then the centre image_size square.

A box is (top, left, height, width) in the original image's pixels. JPEGs are
decoded with libjpeg's DCT scaling (PIL's `draft`): at the smallest 1/2, 1/4 or 1/8
scale that still leaves the box at least image_size pixels each way, so a small crop
of a large photograph costs a fraction of a full decode. Other formats (PNG) are
decoded whole.
"""

import io
import math

import numpy as np
from PIL import Image

ATTEMPTS = 10
ASPECT_RANGE = (3 / 4, 4 / 3)


def inception_box(rng: np.random.Generator, height: int, width: int,
                  area_range=(0.08, 1.0), crop_fraction: float = 0.875) -> tuple[int, int, int, int]:
  """A random Inception crop box of a `height` x `width` image (see the module docstring)."""
  for _ in range(ATTEMPTS):
    area = rng.uniform(*area_range) * height * width
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    box_width = int(round(math.sqrt(area * aspect)))
    box_height = int(round(math.sqrt(area / aspect)))
    if 0 < box_width <= width and 0 < box_height <= height:
      top = int(rng.integers(0, height - box_height + 1))
      left = int(rng.integers(0, width - box_width + 1))
      return top, left, box_height, box_width
  return centre_box(height, width, crop_fraction)


def centre_box(height: int, width: int, crop_fraction: float = 0.875,
               size: int | None = None) -> tuple[float, float, float, float]:
  """The evaluation crop's box: what `resize_shorter_side(image, size / crop_fraction)`
  followed by a centre `size` square takes of the original, to the pixel rounding of
  that reference. Without `size`, the centre square of crop_fraction of the shorter side."""
  if size is None:
    side = crop_fraction * min(height, width)
    return (height - side) / 2, (width - side) / 2, side, side
  shorter = int(round(size / crop_fraction))
  scale = shorter / min(height, width)
  resized_height, resized_width = max(size, round(height * scale)), max(size, round(width * scale))
  top, left = (resized_height - size) // 2, (resized_width - size) // 2
  scale_y, scale_x = height / resized_height, width / resized_width
  return top * scale_y, left * scale_x, size * scale_y, size * scale_x


def open_image(encoded: bytes) -> Image.Image:
  """The encoded image, its header read (size, format), no pixels decoded yet."""
  return Image.open(io.BytesIO(encoded))


def decode_box(encoded: bytes, box, size: int, channels: int) -> np.ndarray:
  """The `box` of the encoded image resized to `size` x `size`: uint8 [size, size, channels]."""
  return resized_box(open_image(encoded), box, size, channels)


def resized_box(image: Image.Image, box, size: int, channels: int) -> np.ndarray:
  """The `box` of an opened, not yet decoded image, decoded and resized to `size` x `size`."""
  height, width = image.height, image.width
  top, left, box_height, box_width = box
  if image.format == "JPEG":  # decode at the smallest scale the box allows
    image.draft(image.mode, (math.ceil(width * size / box_width),
                             math.ceil(height * size / box_height)))
  image = _with_channels(image, channels)
  scale_y, scale_x = image.height / height, image.width / width
  region = (left * scale_x, top * scale_y, (left + box_width) * scale_x,
            (top + box_height) * scale_y)
  resized = image.resize((size, size), Image.BILINEAR, box=region)
  return np.asarray(resized, np.uint8).reshape(size, size, channels)


def decode_whole(encoded: bytes, channels: int) -> np.ndarray:
  """The whole image, uint8 [H, W, channels] (datasets of one image size)."""
  image = _with_channels(Image.open(io.BytesIO(encoded)), channels)
  return np.asarray(image, np.uint8).reshape(image.height, image.width, channels)


def _with_channels(image: Image.Image, channels: int) -> Image.Image:
  mode = "L" if channels == 1 else "RGB"  # CMYK and greyscale JPEGs exist in ImageNet
  return image if image.mode == mode else image.convert(mode)
