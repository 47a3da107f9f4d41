"""A small ResNet on Fashion-MNIST, sized for about 20 minutes on 2 CPU cores.

ResNet-8 (CIFAR-style, n=1: three stages of one basic block at 16/32/64 channels,
BatchNorm, 78k parameters) on per-channel standardized pixels, random crop (pad 2)
+ horizontal flip, label smoothing 0.1, SGD Nesterov momentum 0.9, batch 128,
peak lr 0.1 with a 1-epoch warmup then cosine decay, weight decay 5e-4 on kernels,
15 epochs. The model was chosen by measured speed: ResNet-20 runs ~4x slower per
image here (about 230 img/s on 2 idle cores), which leaves too few epochs in 20 minutes.

  python -m research.main --config=configs/fashion_mnist_resnet.py --workdir=runs/fmnist_resnet

Measured here (one run, commit 8470a6d, the machine shared with other jobs: mean
1-minute load 4.5 on 2 cores): final test accuracy 0.9218 (loss 0.2989) after
15 epochs; 2566 s of training, 42:51 wall in all, 2403 s of CPU time (the job got
0.93 of a core on average), which is about 20 minutes on 2 idle cores. Per epoch:
0.645, 0.539, 0.853, 0.826, 0.874, 0.872, 0.897, 0.895, 0.867, 0.903, 0.910, 0.916,
0.922 (ep 13), 0.922, 0.922. This is SHORT of the 0.935 target: the 78k-parameter net
underfits under this much regularization (train accuracy on augmented batches 0.93).
Early evaluations are low because BatchNorm running averages lag at the peak
learning rate (batch statistics on the same weights gave 0.83 at epoch 2).

Knobs of the model and optimizer are in the config, e.g. `--config.model.width=32`,
`--config.model.name=resnet20` (same knobs), `--config.optimizer.nesterov=False`.
`--config=configs/fashion_mnist_resnet.py:smoke` runs 100 steps.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config("model=resnet8,optimizer=momentum")
  config.dataset.normalize = True
  config.model.width = 16
  config.optimizer.learning_rate = 0.1
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "warmup_cosine"
  config.schedule.warmup_epochs = 1.0
  config.augment.crop_padding = 2
  config.augment.flip = True
  config.label_smoothing = 0.1
  config.batch_size = 128
  config.num_epochs = 15
  config.log_every_steps = 100
  if arg == "smoke":
    config.num_train_steps = 100
    config.schedule.warmup_epochs = 0.0
    config.schedule.warmup_steps = 20
    config.log_every_steps = 50
    config.eval_every_steps = 100
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; accepted: 'smoke'.")
  return config
