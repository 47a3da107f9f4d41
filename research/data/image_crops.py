"""Decoding one stored image into the crop the model sees (streamed datasets only).

Runs per example inside the input workers (research/data/stream_examples.py); imports no
JAX, and OpenCV only at the first decode (in-memory runs import this module, never
decode here). The geometry is the standard ImageNet one (Szegedy et al.; the Flax
ImageNet example; big_vision's `decode_jpeg_and_inception_crop`), taken from the
ORIGINAL image, never from a resized copy:

  training    the Inception crop: up to ATTEMPTS boxes of area_range of the image's area
              and aspect (width / height) log-uniform in ASPECT_RANGE; the first that
              fits is taken at a uniform position, else the evaluation crop (the
              references' fallback); the box is resized to image_size. The flip stays
              on the device (research/data/augment.py).
  evaluation  the shorter side resized to image_size / crop_fraction (0.875: 256 for
              224), then the centre image_size square.

A box is (top, left, height, width) in the original image's pixels, read from the
header alone, by PIL (`image_shape`). Decoding and resizing are OpenCV's (docs/input.md,
"Which decoder": about twice PIL's speed per crop, the same libjpeg-turbo):

  decode   JPEGs with libjpeg's DCT scaling (cv2.IMREAD_REDUCED_*): at the smallest 1/2,
           1/4 or 1/8 scale that still leaves the box at least image_size pixels each
           way, so a small crop of a large photograph costs a fraction of a full decode.
           EXIF orientation is ignored (as PIL, TensorFlow and TFDS do): the box is in the
           stored pixels. Other formats (PNG) are decoded whole.
  resize   bilinear without antialiasing, as big_vision's tf.image.resize: after the DCT
           scaling the box is at most about twice image_size each way, where bilinear
           aliases little, and it is 3-7x cheaper than PIL's antialiased resize. A box on
           whole pixels is cut and resized (cv2.resize); one at fractional pixels (the
           evaluation crop, any box at a DCT scale) is sampled at its exact float
           position (cv2.warpAffine), which cutting at whole pixels would shift by up to
           half a pixel. A box more than twice image_size on a side (its other side too
           short for a DCT scale, or a large image past 1/8) is averaged over each output
           pixel's area instead (cv2.INTER_AREA, its box rounded to whole pixels: under a
           quarter of an output pixel): bilinear there skips input pixels and aliases.

Whole images (datasets of one image size: no crop, no resize) are decoded by PIL, as
before (`decode_whole`, not on the ImageNet path).
"""

import functools
import io
import math

import numpy as np
from PIL import Image

ATTEMPTS = 10
ASPECT_RANGE = (3 / 4, 4 / 3)
AREA_ABOVE = 2.0  # box / image_size past which the resize averages areas (INTER_AREA)

_JPEG = b"\xff\xd8\xff"  # the first bytes of every JPEG: only JPEGs have DCT scaling


class DamagedImage(ValueError):
  """The stored bytes are not an image: PIL cannot read its header, or OpenCV cannot
  decode it."""


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


def image_shape(encoded: bytes) -> tuple[int, int]:
  """(height, width) of the encoded image, from its header alone (PIL reads the headers
  of JPEG, PNG and its other formats without decoding)."""
  try:
    width, height = Image.open(io.BytesIO(encoded)).size
  except Image.UnidentifiedImageError:  # no format's header, a size of 0, or empty
    raise DamagedImage(f"PIL finds no image header in it ({len(encoded)} bytes starting "
                       f"{bytes(encoded[:8])!r}: not an image, or damaged)") from None
  except OSError as e:  # e.g. "Truncated File Read": the header ends early
    raise DamagedImage(f"PIL cannot read its header ({e}; {len(encoded)} bytes)") from None
  return height, width


def decode_box(encoded: bytes, box, size: int, channels: int,
               shape: tuple[int, int] | None = None) -> np.ndarray:
  """The `box` of the encoded image resized to `size` x `size`: uint8 [size, size, channels].
  `shape`: its (height, width) if the caller has read the header already."""
  top, left, box_height, box_width = box
  scale = 1
  if encoded[:3] == _JPEG:  # decode at the smallest scale the box allows
    scale = next(s for s in (8, 4, 2, 1) if min(box_height, box_width) >= s * size or s == 1)
  height, width = (shape or image_shape(encoded)) if scale > 1 else (None, None)
  image = _decode(encoded, channels, scale)
  if scale > 1:  # libjpeg rounds the scaled sides up: the exact ratios, not 1 / scale
    scale_y, scale_x = image.shape[0] / height, image.shape[1] / width
    top, left, box_height, box_width = (top * scale_y, left * scale_x, box_height * scale_y,
                                        box_width * scale_x)
  resized = _resized(image, (top, left, box_height, box_width), size)
  if channels == 3:  # OpenCV decodes to BGR
    cv2 = _opencv()
    return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
  return resized.reshape(size, size, 1)


def decode_whole(encoded: bytes, channels: int) -> np.ndarray:
  """The whole image, uint8 [H, W, channels] (datasets of one image size)."""
  image = Image.open(io.BytesIO(encoded))
  mode = "L" if channels == 1 else "RGB"  # CMYK and greyscale JPEGs exist in ImageNet
  image = image if image.mode == mode else image.convert(mode)
  return np.asarray(image, np.uint8).reshape(image.height, image.width, channels)


def _resized(image: np.ndarray, box, size: int) -> np.ndarray:
  """The float `box` of a decoded image resized to `size` x `size` (the module docstring)."""
  cv2 = _opencv()
  top, left, height, width = box
  if max(height, width) > AREA_ABOVE * size:
    top, left = round(top), round(left)
    bottom, right = max(top + 1, round(top + height)), max(left + 1, round(left + width))
    return cv2.resize(image[top:bottom, left:right], (size, size), interpolation=cv2.INTER_AREA)
  if all(float(v).is_integer() for v in box):
    top, left, height, width = (int(v) for v in box)
    return cv2.resize(image[top:top + height, left:left + width], (size, size),
                      interpolation=cv2.INTER_LINEAR)
  # Output pixel centre x + 0.5 falls at left + (x + 0.5) * width / size in the image,
  # pixel centres at + 0.5: the half-pixel convention of cv2.resize, PIL and tf.image.resize.
  scale_x, scale_y = width / size, height / size
  to_image = np.array([[scale_x, 0, left + 0.5 * scale_x - 0.5],
                       [0, scale_y, top + 0.5 * scale_y - 0.5]])
  return cv2.warpAffine(image, to_image, (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)


def _decode(encoded: bytes, channels: int, scale: int = 1) -> np.ndarray:
  """The image decoded by OpenCV (BGR, or grey) at 1 / `scale` (JPEG only)."""
  cv2 = _opencv()
  if not len(encoded):
    raise DamagedImage("it is empty (0 bytes)")
  try:
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), _decode_flags()[scale, channels])
  except cv2.error as e:  # some malformed files
    raise DamagedImage(f"OpenCV cannot decode it ({str(e).strip().splitlines()[-1]})") from None
  if image is None:
    raise DamagedImage(f"OpenCV cannot decode it ({len(encoded)} bytes starting "
                       f"{bytes(encoded[:8])!r}: not an image, or damaged)")
  return image


@functools.cache
def _opencv():
  """OpenCV, imported at the first decode: every trainer imports this module (through
  research/data/data_source.py), only the streamed input's decode needs OpenCV.

  One thread per process: the parallelism is the input workers; OpenCV's own pool
  would start a thread per core in every worker."""
  import cv2

  cv2.setNumThreads(1)
  return cv2


@functools.cache
def _decode_flags() -> dict[tuple[int, int], int]:
  """cv2.imdecode's flags for (DCT scale, channels); EXIF orientation ignored throughout."""
  cv2 = _opencv()
  return {(scale, channels): flag | cv2.IMREAD_IGNORE_ORIENTATION
          for scale, grey, colour in (
              (1, cv2.IMREAD_GRAYSCALE, cv2.IMREAD_COLOR),
              (2, cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2),
              (4, cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4),
              (8, cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8))
          for channels, flag in ((1, grey), (3, colour))}
