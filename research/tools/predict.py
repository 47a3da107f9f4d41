"""Classifies image files with a trained workdir: top-k class names and probabilities.

  python -m research.predict --workdir=runs/default shirt.png boot.jpg

Each file is read with PIL (PNG or JPEG only), turned upright by its EXIF
orientation, converted to the dataset's channels (grayscale or RGB) and resized
to its height and width. Files are untrusted input: oversized files and images
with more pixels than `--max_pixels` (a decompression bomb guard) are refused.
A file that cannot be used gets its own error line and the others are still
classified; the exit status is 1 if any file failed.
"""

import dataclasses
import os
import sys
import warnings

import numpy as np
from absl import app, flags, logging

from research.errors import UserError
from research.tools.classifier import Classifier

ACCEPTED_FORMATS = ("PNG", "JPEG")

FLAGS = flags.FLAGS


class ImageRefused(Exception):
  """This file cannot be classified; the message says why."""


@dataclasses.dataclass(frozen=True)
class Limits:
  max_file_bytes: int
  max_pixels: int


def load_image(path: str, image_shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
  """A PNG/JPEG file -> uint8 [H, W, C] in the dataset's shape, or ImageRefused."""
  from PIL import Image, ImageOps, UnidentifiedImageError

  height, width, channels = image_shape
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise ImageRefused(f"cannot be read ({e.strerror or e})") from e
  if size > limits.max_file_bytes:
    raise ImageRefused(f"the file has {size:,} bytes, over the limit of "
                       f"{limits.max_file_bytes:,} (--max_file_mb)")
  previous_limit = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = limits.max_pixels
  try:
    with warnings.catch_warnings():
      # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse there too.
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path, formats=ACCEPTED_FORMATS) as image:
        image = ImageOps.exif_transpose(image)
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, dtype=np.uint8)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageRefused(f"too many pixels, refused as a possible decompression bomb ({e}); "
                       "raise --max_pixels if the image is genuine") from e
  except UnidentifiedImageError as e:
    raise ImageRefused(f"not a {' or '.join(ACCEPTED_FORMATS)} image") from e
  except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt image data
    raise ImageRefused(f"the image data cannot be decoded ({e})") from e
  finally:
    Image.MAX_IMAGE_PIXELS = previous_limit
  return pixels.reshape(height, width, channels)


def predict_files(classifier: Classifier, paths: list[str], top_k: int,
                  limits: Limits) -> list[dict]:
  """One result per path, in order: {"path", "top": [(class name, probability)]} or
  {"path", "error"}."""
  results = [{"path": path} for path in paths]
  images, indices = [], []
  for index, path in enumerate(paths):
    try:
      images.append(load_image(path, classifier.info.image_shape, limits))
      indices.append(index)
    except ImageRefused as e:
      results[index]["error"] = str(e)
  if images:
    probabilities = classifier.probabilities(np.stack(images))
    names = classifier.info.class_names
    for index, row in zip(indices, probabilities):
      order = np.argsort(-row)[:top_k]
      results[index]["top"] = [(names[c], float(row[c])) for c in order]
  return results


def _define_flags() -> None:
  """Flags of the command line only, so that importing this module defines none."""
  flags.DEFINE_string("workdir", None, "A training workdir (with checkpoints).")
  flags.DEFINE_string("step", "latest", "Checkpoint: 'latest', 'best' or a step number.")
  flags.DEFINE_integer("top_k", 3, "How many classes to print per image.", lower_bound=1)
  flags.DEFINE_float("max_file_mb", 20, "Refuse files larger than this.")
  flags.DEFINE_integer("max_pixels", 40_000_000,
                       "Refuse images with more pixels (decompression bomb guard).")


def main(argv):
  logging.set_verbosity(logging.ERROR)  # the results are the output; Orbax's notes are not
  paths = argv[1:]
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/default")
  if not paths:
    raise app.UsageError("Give one or more image files after the flags.")
  try:
    classifier = Classifier(FLAGS.workdir, FLAGS.step)
  except UserError as e:
    e.exit()
  limits = Limits(max_file_bytes=int(FLAGS.max_file_mb * 2**20), max_pixels=FLAGS.max_pixels)
  results = predict_files(classifier, paths, FLAGS.top_k, limits)
  for result in results:
    if "error" in result:
      print(f"{result['path']}: error: {result['error']}", file=sys.stderr)
    else:
      top = ", ".join(f"{name} {probability:.3f}" for name, probability in result["top"])
      print(f"{result['path']}: {top}")
  failed = sum("error" in result for result in results)
  if failed:
    print(f"{failed} of {len(results)} files could not be classified.", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
