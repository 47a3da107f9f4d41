"""Speed run: Fashion-MNIST to 0.91+ test accuracy as fast as this codebase can on a CPU.

The seed CNN made twice as wide (Conv64-pool-Conv128-pool-Dense128), batch 128 run as
micro-batches of 64, Adam with a one-cycle schedule (peak 3e-3), random horizontal flips,
6 epochs, an evaluation on the whole test split after every epoch.

  python -m research.main --config=configs/fashion_mnist_speedrun.py --workdir=runs/speedrun

Measured here: see README "Performance" (time to 0.91 / 0.92 / 0.93 from the `elapsed`
field of metrics.jsonl's test lines; `python -m research.speedrun_times WORKDIR` is not
needed: `grep '"split": "test"' WORKDIR/metrics.jsonl` shows them).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config("model=cnn")
  config.model.conv_features = (32, 64)
  config.model.dense_features = 128
  config.optimizer.learning_rate = 4e-3
  config.schedule.name = "one_cycle"
  config.augment.flip = True
  config.batch_size = 64
  config.num_epochs = 5
  config.log_every_steps = 469
  if arg == "long":  # for 0.92-0.93: twice as wide, longer
    config.model.conv_features = (64, 128)
    config.optimizer.learning_rate = 3e-3
    config.batch_size = 128
    config.microbatch_size = 64
    config.num_epochs = 15
    config.log_every_steps = 468
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; accepted: 'long'.")
  return config
