"""Every recipe in configs/ on 1, 2, 4, 8, 16 and 32 devices; memory mode's size check.

The recipes are run as they are written, except for their size: a few steps,
small models and, where the real dataset is not on this machine (CIFAR-10,
ImageNet, imagenette), generated data in the same TFDS formats. Their batch
sizes and eval batch sizes are the recipes' own: the eval batch is rounded up to
a multiple of the device count and padded (every example counted once), the
train batch must divide by it. The device counts are forced CPU devices
(`--xla_force_host_platform_device_count`), one fresh process per count.

On 16 devices every recipe trains and evaluates, a group of them per test (the groups of
a file trained in one fresh process): the Fashion-MNIST recipes here, the CIFAR-10 ones in
test_device_counts_cifar10.py and the ImageNet ones in test_device_counts_imagenet.py
(files of their own, so that `make test`'s workers run them side by side).
"""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_main, with_fast_compile
from test_datasets import LABEL_NAMES
from test_recipes import RECIPES

EVAL_EXAMPLES = 1000  # in every eval split below: at least the largest recipe eval batch

# The recipes trained together on 16 devices, one process per group; every recipe is in one.
GROUPS_ON_16_DEVICES = {
    "fashion_mnist_cnn": [("default", None), ("default", "smoke"),
                          ("fashion_mnist_speedrun", None), ("fashion_mnist_speedrun", "long")],
    "fashion_mnist_resnet": [("default", "model=resnet20,optimizer=lamb"),
                             ("fashion_mnist_resnet", None), ("fashion_mnist_resnet", "smoke")],
    "cifar10_resnet": [("cifar10_resnet", None), ("cifar10_resnet", "smoke"),
                       ("cifar10_resnet", "56")],
    "cifar10_vit": [("cifar10_vit", None), ("cifar10_vit", "smoke")],
    "imagenet_stream": [("imagenet_resnet50", None)],
    "imagenet_memory": [("imagenet_resnet50", "imagenette")],
}


def write_cifar10(folder, train_per_file=110, test=EVAL_EXAMPLES):
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
  if config.model.name == "vit_s":  # the zoo's test size (models.MODELS["vit_s"].smoke)
    config.model.update(depth=1, width=16, num_heads=4, mlp_dim=32)
  elif config.model.name == "cnn":
    config.model.update(conv_features=(4, 8), dense_features=16)
  else:  # the ResNets
    config.model.width = 4
  return config


# Runs in a fresh process with 16 CPU devices: the recipes of argv[1], one after another.
_TRAIN_RECIPES = """\
import dataclasses, functools, importlib, json, sys
sys.path.insert(0, "tests")
from test_device_counts import smoke_size
from research import models
from research.config import config_validation
from research.data import datasets
from research.run import train
# ResNets with one block per stage, their stem, block kind and knobs unchanged: depth sets
# the compile time (ResNet-56's recipe took 87 CPU-s here, ResNet-20's 32, mostly
# compiling), not what 16 devices do; the depths are tested in test_zoo_resnets.py.
for name, entry in list(models.MODELS.items()):
  preset = getattr(entry.constructor, "keywords", {})
  shallow = ({"blocks_per_stage": 1} if "blocks_per_stage" in preset else
             {"stage_sizes": (1, 1, 1, 1)} if "stage_sizes" in preset else None)
  if shallow:
    models.MODELS[name] = dataclasses.replace(
        entry, constructor=functools.partial(entry.constructor, **shallow))
recipes, data_dirs, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
done = {}
for module, arg in recipes:
  config = smoke_size(importlib.import_module(f"configs.{module}").get_config(arg), data_dirs)
  # The JPEG stand-in has no published statistics. From memory they are measured on the
  # decoded train split; a streamed split is never read whole: there, give it
  # imagenet2012's, as the recipe has for the real one.
  if config.dataset.input == "stream":
    datasets.NORMALIZATION["many_jpeg_images"] = datasets.NORMALIZATION["imagenet2012"]
  else:
    datasets.NORMALIZATION.pop("many_jpeg_images", None)
  key = config.to_json()  # e.g. :smoke, at smoke size, is its recipe again: run once
  if key not in done:
    done[key] = train.train_and_evaluate(config_validation.validate(config),
                                         f"{root}/{module}-{arg}")
  final = done[key]
  print(json.dumps({"recipe": f"{module}:{arg}", "batch_size": config.batch_size,
                    "eval_batch_size": config.eval_batch_size,
                    "microbatch_size": config.microbatch_size, "input": config.dataset.input,
                    "model": config.model.name, **final}), flush=True)
"""


def _devices_env(count: int) -> dict:
  return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={count}", "JAX_PLATFORMS": "cpu"}


def train_on_16_devices(groups: list[str], data_dirs: dict, root) -> dict[str, list[dict]]:
  """Trains the recipes of GROUPS_ON_16_DEVICES[group] for each of `groups` at smoke size,
  one after another in one fresh process with 16 CPU devices (their workdirs are
  ROOT/MODULE-ARG); returns each group's final evaluations, one per recipe, for
  `check_group`. The groups of one test file share a process: each process costs its
  imports, JAX's start on 16 devices and the dataset's loading."""
  recipes = [recipe for group in groups for recipe in GROUPS_ON_16_DEVICES[group]]
  env = with_fast_compile(_devices_env(16))  # compiles dominate: a few programs per recipe
  result = subprocess.run(
      [sys.executable, "-c", _TRAIN_RECIPES, json.dumps(recipes), json.dumps(data_dirs),
       str(root)], cwd=REPO, capture_output=True, text=True, timeout=900,
      env={**os.environ, **env})
  assert result.returncode == 0, result.stderr[-5000:]
  finals = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [f["recipe"] for f in finals] == [f"{module}:{arg}" for module, arg in recipes]
  by_group, start = {}, 0
  for group in groups:
    count = len(GROUPS_ON_16_DEVICES[group])
    by_group[group], start = finals[start:start + count], start + count
  return by_group


def check_group(group: str, finals: list[dict]) -> None:
  """What every recipe of `group` must show after training on 16 devices."""
  recipes = GROUPS_ON_16_DEVICES[group]
  assert [f["recipe"] for f in finals] == [f"{module}:{arg}" for module, arg in recipes]
  for (module, arg), final in zip(recipes, finals):
    recipe = importlib.import_module(f"configs.{module}").get_config(arg)
    # The recipe's own settings, but for ImageNet's batch (64 at most here).
    assert final["batch_size"] == (recipe.batch_size if recipe.dataset.name in (
        "fashion_mnist", "cifar10") else min(recipe.batch_size, 64)), final
    assert final["eval_batch_size"] == recipe.eval_batch_size, final
    assert final["microbatch_size"] == recipe.microbatch_size, final
    assert final["input"] == recipe.dataset.input and final["model"] == recipe.model.name, final
    # The eval batch, rounded up to 16 devices, leaves the last one part padding; the
    # padding is masked: every example counted once, none dropped.
    assert EVAL_EXAMPLES % (-(-final["eval_batch_size"] // 16) * 16), final
    assert final["num_examples"] == EVAL_EXAMPLES, final
    assert np.isfinite(final["loss"]), final


def test_every_recipe_is_in_one_group_trained_on_16_devices():
  grouped = [recipe for group in GROUPS_ON_16_DEVICES.values() for recipe in group]
  assert sorted(grouped, key=str) == sorted(RECIPES, key=str)


@pytest.fixture(scope="module")
def fashion_mnist_on_16_devices(tmp_path_factory):
  return train_on_16_devices(["fashion_mnist_cnn", "fashion_mnist_resnet"], {},
                             tmp_path_factory.mktemp("16_devices"))


@pytest.mark.slow
def test_fashion_mnist_cnn_recipes_train_and_evaluate_on_16_devices(fashion_mnist_on_16_devices):
  check_group("fashion_mnist_cnn", fashion_mnist_on_16_devices["fashion_mnist_cnn"])


@pytest.mark.slow
def test_fashion_mnist_resnet_recipes_train_and_evaluate_on_16_devices(
    fashion_mnist_on_16_devices):
  check_group("fashion_mnist_resnet", fashion_mnist_on_16_devices["fashion_mnist_resnet"])


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


@pytest.mark.slow
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
# (Its refusals, on CIFAR-10-format data, are in test_device_counts_cifar10.py.)


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
