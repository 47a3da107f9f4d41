"""The classic CIFAR-10 ResNet recipe (He et al. 2016, section 4.2), with cosine decay.

ResNet-20 (or ResNet-56 with the argument `56`), per-channel standardized pixels,
random crop with 4 pixels of padding + horizontal flip, SGD momentum 0.9, batch
128, lr 0.1 with cosine decay to 0, weight decay 5e-4 on kernels (added to the
gradient, as in the paper), 200 epochs, evaluation on the test split every epoch.

  python -m research.main --config=configs/cifar10_resnet.py --workdir=runs/cifar10_resnet20
  python -m research.main --config=configs/cifar10_resnet.py:56 --workdir=runs/cifar10_resnet56

Expected: about 0.92 test accuracy for ResNet-20 and 0.935 for ResNet-56 (the
published 91.3% / 93.0% with step decay; cosine decay and 5e-4 usually do a bit
better). Not run here: CIFAR-10 is not on this machine (TFDS downloads it where
there is internet). On 2 CPU cores ResNet-20 trains at roughly 200 images/s, i.e.
about 14 hours for 200 epochs: use an accelerator (where `model.conv_impl=auto` picks
lax convolutions). `tests/test_datasets.py` runs this config on generated data in the real
CIFAR-10 format. `:smoke` trains 20 steps.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  depth = "56" if arg and arg.split(",")[0] == "56" else "20"
  config = default.get_config(f"model=resnet{depth},optimizer=momentum")
  config.dataset.name = "cifar10"
  config.dataset.normalize = True
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "cosine"
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.batch_size = 128
  config.num_epochs = 200
  config.log_every_steps = 100
  for item in filter(None, (arg or "").split(",")):
    if item == "smoke":
      config.num_train_steps = 20
      config.log_every_steps = 10
      config.eval_every_steps = 20
    elif item not in ("20", "56"):
      raise ValueError(f"Unknown config argument {item!r}; accepted: '20', '56', 'smoke'.")
  return config
