"""Every recipe in configs/ is a valid config, and the Fashion-MNIST ResNet recipe trains."""

import importlib
import os

import ml_collections
import pytest

from research import models
from research.config import config_validation
from research.run import optim
from conftest import records, run_here

# (config module, argument) for every variant the recipes accept.
RECIPES = [("default", None), ("default", "smoke"), ("default", "model=resnet20,optimizer=lamb"),
           ("fashion_mnist_resnet", None), ("fashion_mnist_resnet", "smoke"),
           ("fashion_mnist_speedrun", None), ("fashion_mnist_speedrun", "long"),
           ("cifar10_resnet", None), ("cifar10_resnet", "smoke"), ("cifar10_resnet", "56"),
           ("cifar10_vit", None), ("cifar10_vit", "smoke"),
           ("imagenet_resnet50", None), ("imagenet_resnet50", "imagenette")]


def test_the_list_covers_every_recipe_file():
  files = {name[:-3] for name in os.listdir("configs") if name.endswith(".py")} - {"__init__"}
  assert files == {module for module, _ in RECIPES}


@pytest.mark.parametrize("module,arg", RECIPES)
def test_recipe_is_valid_and_builds(module, arg):
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  assert isinstance(config, ml_collections.ConfigDict)
  config_validation.validate(config)  # names, knobs, relations: builds nothing
  # What the run builds from it (the model's classes and the schedule's length come from
  # the data; any will do here).
  models.build(config.model, num_classes=10)
  optim.build_optimizer(config.optimizer, config.schedule, steps_per_epoch=1, total_steps=2**30)


@pytest.mark.slow
def test_fashion_mnist_resnet_recipe_trains_and_learns(tmp_path):
  """The recipe as written (bfloat16 matmuls, pool stem, micro-batches), 24 steps: the
  fewest multiple of 8 past its 20 warmup steps (0.43 test accuracy on this machine).
  Its steps at full width are most of the cost, so it is compiled as the recipe is (the
  less optimized code would run them slower)."""
  workdir = tmp_path / "run"
  result = run_here(workdir, "--config=configs/fashion_mnist_resnet.py:smoke",
                    "--config.num_train_steps=24", "--config.eval_every_steps=24",
                    "--config.log_every_steps=8", "--config.dataset.eval_split=test[:1000]")
  assert result.returncode == 0, result.stderr[-3000:]
  test = [r for r in records(workdir) if r["split"] == "test[:1000]"]
  assert test[-1]["step"] == 24 and test[-1]["num_examples"] == 1000
  assert test[-1]["accuracy"] > 0.3  # chance is 0.1
