"""research.tools.predict: top-k classes for image files; clear per-file errors for the rest."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from research.tools.predict import ImageRefused, Limits, load_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (28, 28, 1)
LIMITS = Limits(max_file_bytes=1 << 20, max_pixels=1_000_000)


def test_any_png_or_jpeg_becomes_the_dataset_shape(tmp_path):
  rgb = np.zeros((90, 60, 3), np.uint8)
  rgb[:, :30] = 255
  Image.fromarray(rgb).save(tmp_path / "photo.jpg")
  Image.fromarray(np.full((10, 10, 4), 200, np.uint8)).save(tmp_path / "alpha.png")
  pixels = load_image(str(tmp_path / "photo.jpg"), SHAPE, LIMITS)
  assert pixels.shape == SHAPE and pixels.dtype == np.uint8
  assert pixels[:, :10].mean() > 200 and pixels[:, -10:].mean() < 50  # left half white
  assert load_image(str(tmp_path / "alpha.png"), SHAPE, LIMITS).shape == SHAPE
  assert load_image(str(tmp_path / "photo.jpg"), (32, 32, 3), LIMITS).shape == (32, 32, 3)


def test_unusable_files_are_refused_with_the_reason(tmp_path):
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(ImageRefused, match="not a PNG or JPEG image"):
    load_image(str(tmp_path / "notes.txt"), SHAPE, LIMITS)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "picture.gif")
  with pytest.raises(ImageRefused, match="not a PNG or JPEG image"):
    load_image(str(tmp_path / "picture.gif"), SHAPE, LIMITS)
  with pytest.raises(ImageRefused, match="cannot be read"):
    load_image(str(tmp_path / "missing.png"), SHAPE, LIMITS)
  data = (tmp_path / "cut.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(data)
  data.write_bytes(data.read_bytes()[:300])
  with pytest.raises(ImageRefused, match="cannot be decoded"):
    load_image(str(data), SHAPE, LIMITS)


def test_decompression_bombs_and_oversized_files_are_refused(tmp_path):
  # 2000 x 2000 black pixels compress to a few kB: small file, many pixels.
  Image.fromarray(np.zeros((2000, 2000), np.uint8)).save(tmp_path / "bomb.png")
  assert os.path.getsize(tmp_path / "bomb.png") < LIMITS.max_file_bytes
  with pytest.raises(ImageRefused, match="decompression bomb"):
    load_image(str(tmp_path / "bomb.png"), SHAPE, LIMITS)  # 4 M pixels > 1 M allowed
  with pytest.raises(ImageRefused, match="decompression bomb"):  # and past PIL's own 2x limit
    load_image(str(tmp_path / "bomb.png"), SHAPE, Limits(1 << 20, max_pixels=1_500_000))
  with pytest.raises(ImageRefused, match="over the limit"):
    load_image(str(tmp_path / "bomb.png"), SHAPE, Limits(max_file_bytes=100, max_pixels=10**8))
  assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global limit is put back afterwards


@pytest.mark.slow
def test_classifies_test_set_pngs_and_reports_a_text_file(trained_workdir, fashion_mnist,
                                                          tmp_path):
  info, _, test = fashion_mnist
  picks = np.random.default_rng(1).choice(len(test), 20, replace=False)
  paths, labels = [], []
  for index in picks:
    path = tmp_path / f"test_{index}.png"
    Image.fromarray(test.images[index][:, :, 0]).save(path)
    paths.append(str(path))
    labels.append(info.class_names[test.labels[index]])
  notes = tmp_path / "notes.txt"
  notes.write_text("a text file, not an image\n")
  command = [sys.executable, "-m", "research.predict", f"--workdir={trained_workdir}",
             "--top_k=2", *paths[:10], str(notes), *paths[10:]]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1  # one file failed ...
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 20  # ... and all the others were classified, in order
  correct = 0
  for line, path, label in zip(lines, paths, labels):
    name, _, top = line.partition(": ")
    assert name == path
    first, second = top.split(", ")
    assert float(first.rsplit(" ", 1)[1]) >= float(second.rsplit(" ", 1)[1])
    correct += first.rsplit(" ", 1)[0] == label
  assert correct >= 14, result.stdout  # the model is ~80% accurate
  assert f"{notes}: error: not a PNG or JPEG image" in result.stderr
  assert "1 of 21 files could not be classified" in result.stderr
  assert "Traceback" not in result.stderr
