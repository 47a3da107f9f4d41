"""The ImageNet crops of streamed datasets (research/data/image_crops.py) against references.

A generated JPEG of known layout (a smooth colour ramp, 500 x 375 like an ImageNet
photograph): training crops stay inside it and together cover all of it, with the
Inception crop's area and aspect ranges; the evaluation crop (shorter side to
size / 0.875, centre square) equals a plain resize-then-crop within one grey level;
the DCT-scaled decode of a small box stays close to a full decode of that box. The
resize samples a box at its exact float position (bilinear) and averages areas past
twice the output size; headers are read without decoding; greyscale, CMYK and PNG
images decode; an undecodable record is the damaged-data error; OpenCV is imported only
at the first decode.
"""

import io
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from research import REPOSITORY
from research.data import datasets, image_crops
from research.data.stream_examples import ExampleReader
from research.errors import UserError

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


def _encoded(pixels, format, mode=None, **options):
  """`pixels` encoded in `format` (converted to PIL's `mode` first, e.g. CMYK)."""
  image = Image.fromarray(pixels)
  encoded = io.BytesIO()
  (image.convert(mode) if mode else image).save(encoded, format=format, **options)
  return encoded.getvalue()


def _smooth_texture(height=HEIGHT, width=WIDTH):
  """Random blobs a few pixels wide: steep enough that half a pixel shows."""
  noise = np.random.default_rng(0).integers(0, 256, (height // 5 + 2, width // 5 + 2, 3))
  return cv2.resize(noise.astype(np.float32), (width, height),
                    interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def _bilinear(image, box, size):
  """Reference resize in float64: output pixel x samples the image at
  left + (x + 0.5) * width / size - 0.5 (half-pixel centres), bilinearly."""
  top, left, height, width = box
  ys = np.clip(top + (np.arange(size) + 0.5) * height / size - 0.5, 0, image.shape[0] - 1)
  xs = np.clip(left + (np.arange(size) + 0.5) * width / size - 0.5, 0, image.shape[1] - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, image.shape[0] - 1), np.minimum(x0 + 1, image.shape[1] - 1)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  pixels = image.astype(np.float64)
  return ((1 - fy) * ((1 - fx) * pixels[y0][:, x0] + fx * pixels[y0][:, x1])
          + fy * ((1 - fx) * pixels[y1][:, x0] + fx * pixels[y1][:, x1]))


@pytest.mark.parametrize("box", [(10, 20, 300, 280), (10.25, 20.5, 300.5, 279.75),
                                 (100.3, 50.6, 150.2, 170.9),
                                 image_crops.centre_box(HEIGHT, WIDTH, 0.875, 224)])
def test_a_box_is_resized_from_its_exact_position(box):
  """On a lossless PNG (no DCT scale): whole-pixel and fractional boxes, down and up,
  against the float reference; cutting the box at whole pixels would be off by up to
  half a pixel (tens of grey levels on this texture)."""
  texture = _smooth_texture()
  crop = image_crops.decode_box(_encoded(texture, "PNG"), box, 224, 3)
  difference = np.abs(crop - _bilinear(texture, box, 224))
  assert difference.max() <= 2 and difference.mean() < 0.5
  if not all(float(v).is_integer() for v in box):
    cut = (round(box[0]), round(box[1]), box[2], box[3])
    assert np.abs(crop - _bilinear(texture, cut, 224)).mean() > 3


def test_a_box_past_twice_the_size_is_averaged_not_sampled():
  """A 256-px box to 64 px: each output pixel the mean of its 4 x 4 input pixels (no
  aliasing), which bilinear sampling (2 of every 4 pixels) is far from."""
  texture = np.random.default_rng(1).integers(0, 256, (300, 300, 3)).astype(np.uint8)
  crop = image_crops.decode_box(_encoded(texture, "PNG"), (20, 30, 256, 256), 64, 3)
  means = texture[20:276, 30:286].reshape(64, 4, 64, 4, 3).mean((1, 3))
  assert np.abs(crop - means).max() <= 1
  assert np.abs(_bilinear(texture, (20, 30, 256, 256), 64) - means).mean() > 10


def test_the_header_gives_the_size_without_decoding():
  """JPEG (baseline, progressive, greyscale, CMYK, with EXIF) and PNG; an EXIF orientation
  is ignored, as by PIL, TensorFlow and TFDS: the box is in the stored pixels."""
  pixels = _smooth_texture(60, 90)
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: "rotate 90 degrees to display"
  images = {"baseline": _encoded(pixels, "JPEG"),
            "progressive": _encoded(pixels, "JPEG", progressive=True),
            "greyscale": _encoded(pixels[..., 0], "JPEG"),
            "CMYK": _encoded(pixels, "JPEG", mode="CMYK"),
            "EXIF": _encoded(pixels, "JPEG", exif=exif.tobytes()),
            "PNG": _encoded(pixels, "PNG")}
  for name, encoded in images.items():
    assert image_crops.image_shape(encoded) == (60, 90), name
  crop = image_crops.decode_box(images["EXIF"], (0, 0, 60, 90), 30, 3)
  stored = image_crops.decode_box(images["baseline"], (0, 0, 60, 90), 30, 3)
  np.testing.assert_array_equal(crop, stored)


def test_greyscale_cmyk_and_png_images_decode_to_the_dataset_channels():
  grey = _encoded(np.full((40, 60), 128, np.uint8), "JPEG")
  image = image_crops.decode_box(grey, (0, 0, 40, 40), 16, 3)
  assert image.shape == (16, 16, 3) and np.abs(image.astype(int) - 128).max() <= 1
  colour = np.zeros((40, 60, 3), np.uint8)
  colour[..., 0] = 200  # red: a swapped channel order would show it as blue
  for encoded in (_encoded(colour, "JPEG", quality=95),
                  _encoded(colour, "JPEG", mode="CMYK", quality=95), _encoded(colour, "PNG")):
    image = image_crops.decode_box(encoded, (0, 0, 40, 40), 16, 3)
    assert image.shape == (16, 16, 3) and np.abs(image.astype(int) - (200, 0, 0)).max() <= 3
    image = image_crops.decode_box(encoded, (0, 0, 40, 40), 16, 1)  # luma, ITU-R 601
    assert image.shape == (16, 16, 1) and np.abs(image.astype(int) - 60).max() <= 3
  numbers = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
  png = _encoded(numbers, "PNG")
  np.testing.assert_array_equal(image_crops.decode_whole(png, 1)[..., 0], numbers)
  np.testing.assert_array_equal(image_crops.decode_box(png, (0, 0, 28, 28), 28, 1)[..., 0],
                                numbers)


class _Records:
  """Stands in for the TFDS data source: examples of the given image bytes."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitems__(self, indices):
    return [{"image": self.images[i], "label": 0} for i in indices]


@pytest.mark.parametrize("damage,reason", [
    ("not an image", "PIL cannot read its header"), ("cut short", "OpenCV cannot decode it"),
    ("header cut short", "PIL cannot read its header"), ("empty", "PIL finds no image header")])
def test_an_undecodable_image_is_the_damaged_data_error(ramp_jpeg, damage, reason):
  encoded = {"not an image": b"\xff\xd8\xff\xe0 not a JPEG at all" * 4,
             "cut short": ramp_jpeg[:len(ramp_jpeg) // 2],
             "header cut short": ramp_jpeg[:100],
             "empty": b""}[damage]
  reader = ExampleReader(source=_Records([ramp_jpeg, encoded]),
                         damaged_message="The prepared data looks damaged: run `make data`.",
                         image_shape=(32, 32, 3), resize=True, crop_fraction=0.875,
                         area_range=(0.08, 1.0))
  assert reader.read([0], "centre")[0].shape == (1, 32, 32, 3)
  for crop in ("centre", "inception"):
    with pytest.raises(UserError, match=r"looks damaged: run `make data`. \(DamagedImage: "
                                         rf"example 1: {reason}"):
      reader.read([0, 1], crop, seeds=[(0, 0, 0), (0, 0, 1)])


def test_the_trainer_imports_opencv_only_to_decode(tmp_path):
  """A run imports image_crops (through the config's schema) whatever its input; OpenCV
  is loaded at the first decode, with one thread, and grain (0.5 s) by streamed datasets
  only, so our modules leave both out of in-memory runs. (TFDS, imported to prepare any
  dataset, loads OpenCV itself when installed.)"""
  png = tmp_path / "image.png"
  png.write_bytes(_encoded(np.zeros((28, 28), np.uint8), "PNG"))
  script = ("import sys\nimport research.main\nfrom research.data import data_source\n"
            "from research.run import train\nfrom research.config import config_validation\n"
            "assert 'grain' not in sys.modules, 'grain imported by an in-memory run'\n"
            "assert 'research.data.image_crops' in sys.modules\n"
            "assert 'cv2' not in sys.modules, 'OpenCV imported before any decode'\n"
            "from research.data import image_crops\n"
            "image_crops.decode_box(open(sys.argv[1], 'rb').read(), (0, 0, 28, 28), 28, 1)\n"
            "assert sys.modules['cv2'].getNumThreads() == 1\n")
  result = subprocess.run([sys.executable, "-c", script, str(png)], cwd=REPOSITORY,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
