"""ViT-S/4 trained from scratch on CIFAR-10 with AdamW.

vit_s (width 384, depth 12, 6 heads) on 4x4 patches (8x8 = 64 tokens), per-channel
standardized pixels, random crop (pad 4) + flip, AdamW (b2 0.99) lr 1e-3 with 10
warmup epochs then cosine decay, weight decay 0.05 (decoupled, kernels only),
gradient clipping at norm 1, label smoothing 0.1, batch 512, 200 epochs.

  python -m research.main --config=configs/cifar10_vit.py --workdir=runs/cifar10_vit

Expected: about 0.87-0.90 test accuracy (ViTs from scratch on CIFAR-10 without
RandAugment/Mixup plateau there). Not run here: CIFAR-10 is not on this machine,
and the 21M-parameter model needs an accelerator (`--config.model.dtype=bfloat16`
on TPU/GPU). `:smoke` trains 10 steps of a 2-block model.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config("model=vit_s,optimizer=adamw")
  config.dataset.name = "cifar10"
  config.dataset.normalize = True
  config.model.patch_size = 4
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = "warmup_cosine"
  config.schedule.warmup_epochs = 10.0
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.label_smoothing = 0.1
  config.batch_size = 512
  config.num_epochs = 200
  config.log_every_steps = 50
  if arg == "smoke":
    config.model.depth = 2
    config.model.width = 64
    config.model.num_heads = 4  # the width must divide by the heads (6 does not divide 64)
    config.num_train_steps = 10
    config.batch_size = 32
    config.schedule.warmup_epochs = 0.0
    config.schedule.warmup_steps = 2
    config.log_every_steps = 5
    config.eval_every_steps = 10
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; accepted: 'smoke'.")
  return config
