"""ResNet-50 on ImageNet: the standard 90-epoch recipe (Goyal et al. 2017 + label smoothing).

Batch 1024, SGD Nesterov momentum 0.9, lr 0.4 (0.1 x batch / 256) with 5 warmup
epochs then cosine decay, weight decay 1e-4 on kernels, label smoothing 0.1,
random-resized crop + flip at 224 pixels, ImageNet mean/std, bfloat16 compute,
lax convolutions (`conv_impl=xla`, the fast choice on accelerators).

  python -m research.main --config=configs/imagenet_resnet50.py --workdir=runs/i1k_r50

Expected: about 0.77 top-1 on the validation split (the references' figure for this
recipe). NOT MEASURED HERE: no run of this config on ImageNet has been made in this
repository, on any hardware. Data: imagenet2012 must be prepared in TFDS (manual
download). It is streamed (`dataset.input="stream"`, research/data/stream_input.py): every
host reads its rows of each batch from the array_record files, and `dataset.workers`
processes (-1: one per core) decode them per example with the standard crops from the
original image: training the Inception crop (8-100% of the area, aspect 3/4-4/3,
`dataset.min_crop_area`/`max_crop_area`), evaluation the shorter side resized to
224 / 0.875 = 256 and the centre 224 square (`dataset.crop_fraction`); the flip and the
normalization run on the device. What IS measured (docs/input.md, `make bench-input`):
the input's images/s per core on 500x375 photographs on a 2-core CPU machine, from
which the docs estimate the cores a host needs (720 img/s per core through the workers
on the Zen 3 measured: about 35 cores to feed 8 H100s); GPU step times and host-to-device
transfers are not. Watch the input share of the progress line on a real host.
`:imagenette` trains on imagenette/320px-v2 at 128 pixels for 40 epochs, batch 128,
from memory (`dataset.input="memory"`): its 9.5k images are ~470 MB at 128 pixels,
decoded and resized once into a cache beside the data and gathered on the device at
no cost, where streaming would decode every JPEG again in every epoch.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config("model=resnet50,optimizer=momentum")
  config.dataset.name = "imagenet2012"
  config.dataset.eval_split = "validation"
  config.dataset.image_size = 224
  config.dataset.normalize = True
  config.dataset.input = "stream"
  config.dataset.workers = -1  # decoding processes: one per core
  config.model.conv_impl = "xla"
  config.model.dtype = "bfloat16"
  config.optimizer.learning_rate = 0.4
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = "warmup_cosine"
  config.schedule.warmup_epochs = 5.0
  config.augment.random_resized_crop = True
  config.augment.flip = True
  config.label_smoothing = 0.1
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 90
  config.log_every_steps = 100
  if arg == "imagenette":
    config.dataset.name = "imagenette/320px-v2"
    config.dataset.image_size = 128
    config.dataset.input = "memory"
    config.dataset.workers = 0
    config.optimizer.learning_rate = 0.05
    config.batch_size = 128
    config.eval_batch_size = 250
    config.num_epochs = 40
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; accepted: 'imagenette'.")
  return config
