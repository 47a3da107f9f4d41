"""Every recipe in configs/ on 1, 2, 4, 8, 16 and 32 devices; memory mode's size check.

The recipes are run as they are written, except for their size: a few steps,
small models and, where the real dataset is not on this machine (CIFAR-10,
ImageNet, imagenette), generated data in the same TFDS formats. Their batch
sizes and eval batch sizes are the recipes' own: the eval batch is rounded up to
a multiple of the device count and padded (every example counted once), the
train batch must divide by it. The device counts are forced CPU devices
(`--xla_force_host_platform_device_count`), one fresh process per count.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_main, with_fast_compile
from test_datasets import LABEL_NAMES, Cifar10, TinyJpegImages
from test_recipes import RECIPES

EVAL_EXAMPLES = 1000  # in every eval split below: at least the largest recipe eval batch


class ManyJpegImages(TinyJpegImages):
  """JPEGs of varying sizes with a validation split, standing in for imagenet2012 and
  imagenette (read back by name with TFDS's read-only builder, unregistered)."""

  TRAIN_EXAMPLES, EVAL_EXAMPLES, MAX_SIDE = 130, EVAL_EXAMPLES, 40


def _write_cifar10(folder, train_per_file=110, test=EVAL_EXAMPLES):
  """The original CIFAR-10 binary layout: enough training examples for the ViT recipe's
  batch of 512 (5 x 110) and a test split as large as the recipes' eval batch."""
  rng = np.random.default_rng(0)
  batches = os.path.join(folder, "cifar-10-batches-bin")
  os.makedirs(batches)
  with open(os.path.join(batches, "batches.meta.txt"), "w") as f:
    f.write("\n".join(LABEL_NAMES) + "\n")
  for name, count in [(f"data_batch_{i}.bin", train_per_file) for i in range(1, 6)] + [
      ("test_batch.bin", test)]:
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    pixels = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
    np.concatenate([labels[:, None], pixels], axis=1).tofile(os.path.join(batches, name))


@pytest.fixture(scope="module")
def generated_data(tmp_path_factory):
  """{"cifar10": data_dir, "jpeg": data_dir}, prepared by TFDS once for this module."""
  root = tmp_path_factory.mktemp("generated")
  _write_cifar10(str(root / "cifar_source"))
  Cifar10.source = str(root / "cifar_source")
  Cifar10(data_dir=str(root / "cifar10"), file_format="array_record").download_and_prepare()
  ManyJpegImages(data_dir=str(root / "jpeg"), file_format="array_record").download_and_prepare()
  return {"cifar10": str(root / "cifar10"), "jpeg": str(root / "jpeg")}


def smoke_size(config, data_dirs: dict):
  """`config` (a recipe) at smoke size on local data; batch sizes, eval batch sizes,
  micro-batches, input mode and model families stay the recipe's own."""
  config.update(num_train_steps=2, log_every_steps=2, eval_every_steps=2,
                checkpoint_every_steps=0)
  config.schedule.update(warmup_epochs=0.0, warmup_steps=1)
  name = config.dataset.name
  if name == "fashion_mnist":  # on this machine: the real dataset, a few of its examples
    config.dataset.update(train_split="train[:4096]", eval_split=f"test[:{EVAL_EXAMPLES}]")
  elif name == "cifar10":
    config.dataset.data_dir = data_dirs["cifar10"]
  else:  # imagenet2012 and imagenette: JPEGs of varying sizes, resized
    config.dataset.update(name="many_jpeg_images", data_dir=data_dirs["jpeg"], image_size=32)
    config.batch_size = min(config.batch_size, 64)  # 1024 images on 2 CPU cores is minutes
  # Narrow models: 1000 test images through a ResNet-20 of width 16 cost half a CPU-minute.
  if config.model.name == "vit_s":
    config.model.update(depth=2, width=64, num_heads=4)  # as its :smoke
  elif config.model.name == "cnn":
    config.model.update(conv_features=(4, 8), dense_features=16)
  else:  # the ResNets
    config.model.width = 4
  return config


# Runs in a fresh process with 16 CPU devices: every recipe, one after another.
_EVERY_RECIPE = """\
import importlib, json, sys
sys.path.insert(0, "tests")
from test_device_counts import smoke_size
from test_recipes import RECIPES
from research.config import config_validation
from research.data import datasets
from research.run import train
# The JPEG stand-in has no published statistics; a streamed dataset is never read whole
# to measure them: give it imagenet2012's, as the recipe has for the real one.
datasets.NORMALIZATION["many_jpeg_images"] = datasets.NORMALIZATION["imagenet2012"]
data_dirs, root = json.loads(sys.argv[1]), sys.argv[2]
done = {}
for module, arg in RECIPES:
  config = smoke_size(importlib.import_module(f"configs.{module}").get_config(arg), data_dirs)
  key = config.to_json()  # e.g. :smoke, at smoke size, is its recipe again: run once
  if key not in done:
    done[key] = train.train_and_evaluate(config_validation.validate(config),
                                         f"{root}/{module}-{arg}")
  final = done[key]
  print(json.dumps({"recipe": f"{module}:{arg}", "batch_size": config.batch_size,
                    "eval_batch_size": config.eval_batch_size, "input": config.dataset.input,
                    **final}), flush=True)
"""


def _devices_env(count: int) -> dict:
  return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={count}", "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
def test_every_recipe_trains_and_evaluates_on_16_devices(generated_data, tmp_path):
  env = with_fast_compile(_devices_env(16))  # compiles dominate: about a hundred programs
  result = subprocess.run(
      [sys.executable, "-c", _EVERY_RECIPE, json.dumps(generated_data), str(tmp_path)], cwd=REPO,
      capture_output=True, text=True, timeout=900, env={**os.environ, **env})
  assert result.returncode == 0, result.stderr[-5000:]
  finals = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [f["recipe"] for f in finals] == [f"{module}:{arg}" for module, arg in RECIPES]
  for final in finals:
    assert final["num_examples"] == EVAL_EXAMPLES, final  # padding masked, nothing dropped
    assert np.isfinite(final["loss"]), final
  # The eval batches the recipes ask for do not divide by 16: they were padded.
  assert {f["eval_batch_size"] for f in finals} >= {1000, 100, 250}
  assert {f["input"] for f in finals} == {"memory", "stream"}


# Runs in a fresh process per device count: what every recipe's run checks before data.
_CHECK_EVERY_RECIPE = """\
import importlib, json, sys
import jax
sys.path.insert(0, "tests")
from test_recipes import RECIPES
from research import mesh
from research.config import config_validation
from research.run import step_schedule
for module, arg in RECIPES:
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  config_validation.validate(config)
  print(json.dumps({"recipe": f"{module}:{arg}", "devices": jax.device_count(),
                    "microbatches": step_schedule.microbatch_count(config),
                    "eval_batch": mesh.rounded_to_devices(config.eval_batch_size,
                                                          mesh.make_mesh())}))
"""


def test_every_recipe_passes_its_checks_on_1_to_32_devices():
  """16 devices run for real above; the other counts run every check a recipe meets
  before it reads data (validate, micro-batches, the eval batch's rounding)."""
  counts = (1, 2, 4, 8, 32)
  processes = {count: subprocess.Popen(
      [sys.executable, "-c", _CHECK_EVERY_RECIPE], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env={**os.environ, **_devices_env(count)})
      for count in counts}
  for count, process in processes.items():
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, (count, stderr[-3000:])
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert len(lines) == len(RECIPES) and all(line["devices"] == count for line in lines)
    for line in lines:
      assert line["eval_batch"] % count == 0 and line["microbatches"] >= 1
  by_recipe = {line["recipe"]: line for line in lines}  # 32 devices
  assert by_recipe["fashion_mnist_resnet:None"]["eval_batch"] == 128  # 100, rounded up
  assert by_recipe["imagenet_resnet50:imagenette"]["eval_batch"] == 256  # 250


def test_a_batch_that_cannot_split_is_still_refused_on_16_devices(tmp_path):
  workdir = tmp_path / "run"
  result = run_main(str(workdir), "--config=configs/fashion_mnist_resnet.py",
                    "--config.batch_size=120", env=_devices_env(16))
  assert result.returncode == 2
  assert "--config.batch_size=120 is not accepted" in result.stderr
  assert "multiple of 16, e.g. 112 or 128" in result.stderr
  assert "Traceback" not in result.stderr and not workdir.exists()


# ---- Memory mode's size check ------------------------------------------------


@pytest.mark.parametrize("variable,where", [("RESEARCH_DEVICE_MEMORY_BYTES", "device memory"),
                                            ("RESEARCH_HOST_MEMORY_BYTES", "host memory")])
def test_memory_mode_refuses_a_dataset_larger_than_memory_before_decoding(
    variable, where, generated_data, tmp_path):
  """CIFAR-10-format data (550 + 1000 examples of 3 kB: 4.8 MB) against 4 MB of device
  or host memory: refused with the sizes and the stream alternative, before any
  split is decoded (no decoded cache beside the data) and before the workdir is used."""
  workdir = tmp_path / "run"
  decoded = lambda: {path for path, _, _ in os.walk(generated_data["cifar10"]) if ".decoded" in path}
  decoded_before = decoded()  # other tests of this module may have decoded it already
  result = run_main(str(workdir), "--config=configs/cifar10_resnet.py:smoke",
                    f"--config.dataset.data_dir={generated_data['cifar10']}",
                    env={**_devices_env(2), variable: str(4 * 10**6)})
  assert result.returncode == 2, result.stderr[-3000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith(f"error: cifar10 at 32x32x3 does not fit in {where}")
  assert "--config.dataset.input=stream" in message and "4.0 MB" in message
  assert "Traceback" not in result.stderr and not workdir.exists()
  assert decoded() == decoded_before


def test_memory_check_sizes_splits_from_the_metadata_and_device_statistics(monkeypatch):
  """The estimate (uint8 pixels + an int32 label per example, any split slice) and the
  limits: a device that reports `bytes_limit` (faked: a CPU reports none) and the env
  variables; a dataset within the limits passes."""
  import jax
  import ml_collections

  from research.data import memory_fit, prepare_data
  from research.errors import UserError

  builder = prepare_data.ensure_prepared("fashion_mnist")
  assert memory_fit.split_bytes(builder, "train", (28, 28, 1)) == 60000 * (784 + 4)
  assert memory_fit.split_bytes(builder, "test[:1000]", (14, 14, 1)) == 1000 * (196 + 4)
  assert memory_fit.split_bytes(builder, "no_such_split", (28, 28, 1)) is None
  assert jax.local_devices()[0].memory_stats() is None  # the CPU: only the host is checked
  assert memory_fit.device_memory() is None
  config = ml_collections.ConfigDict({"name": "fashion_mnist"})
  memory_fit.check(builder, config, (28, 28, 1), ["train"], ["test"])  # fits this machine

  class Device:  # how a GPU or TPU reports its memory (fault simulation on the CPU)
    platform, id = "gpu", 0

    def memory_stats(self):
      return {"bytes_limit": 80 * 10**6, "bytes_in_use": 0}

  monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
  assert memory_fit.device_memory() == (80 * 10**6, "gpu:0")
  with pytest.raises(UserError, match=r"55.2 MB on each device .* 80.0 MB of gpu:0"):
    memory_fit.check(builder, config, (28, 28, 1), ["train"], ["test"])
  memory_fit.check(builder, config, (28, 28, 1), ["test"], [])  # 7.9 MB: fits
