"""Whether a dataset fits memory mode, checked before anything is decoded or copied.

Memory mode (`config.dataset.input="memory"`, `data.load`) decodes each split on
the host, then puts the whole train split on every device and divides the eval
split among them. `check` estimates those sizes from the dataset's metadata alone
(TFDS's example counts and the image shape after resizing, uint8 pixels plus an
int32 label) and refuses, naming `--config.dataset.input=stream`, when

  - the data on one device would exceed DEVICE_SHARE of its memory, where the
    backend reports it (`device.memory_stats()["bytes_limit"]`: GPUs and TPUs; the
    CPU reports none, its devices share the host's memory); the rest is for the
    model, the optimizer state and the activations;
  - decoding would exceed the host's available memory (/proc/meminfo MemAvailable):
    it holds a split twice, the decoded images and their stacked array.

Both limits can be given by hand, for a backend that reports none or to try the
check on a small machine: RESEARCH_DEVICE_MEMORY_BYTES (each device's memory)
and RESEARCH_HOST_MEMORY_BYTES (the host's available memory).
"""

import math
import os
from typing import Sequence

import jax

from research.errors import UserError

DEVICE_SHARE = 0.5  # of each device's memory, at most, for the dataset
HOST_COPIES = 2  # decoded images and their stacked array, while a split is decoded
DEVICE_MEMORY_ENV = "RESEARCH_DEVICE_MEMORY_BYTES"
HOST_MEMORY_ENV = "RESEARCH_HOST_MEMORY_BYTES"


def split_bytes(builder, split: str, image_shape: Sequence[int]) -> int | None:
  """Bytes of `split` in memory (uint8 images of `image_shape`, int32 labels), from the
  dataset's metadata; None where it cannot tell (an unknown split is reported later,
  by the reader, with the accepted names)."""
  try:
    count = builder.info.splits[split].num_examples
  except Exception:  # unknown split or damaged metadata: not this check's to report
    return None
  return int(count) * (math.prod(image_shape) + 4)


def device_memory() -> tuple[int, str] | None:
  """(bytes, which device) of the smallest local device memory, or None where the
  backend reports none (CPU) and RESEARCH_DEVICE_MEMORY_BYTES is not set."""
  if os.environ.get(DEVICE_MEMORY_ENV):
    return int(os.environ[DEVICE_MEMORY_ENV]), f"each device ({DEVICE_MEMORY_ENV})"
  limits = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics
      stats = {}
    if stats.get("bytes_limit"):
      limits.append((int(stats["bytes_limit"]), f"{device.platform}:{device.id}"))
  return min(limits) if limits else None


def host_memory() -> tuple[int, str] | None:
  """(bytes, where it was read) of the memory available to this host now, or None."""
  if os.environ.get(HOST_MEMORY_ENV):
    return int(os.environ[HOST_MEMORY_ENV]), HOST_MEMORY_ENV
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available pages"
  except (ValueError, OSError):
    return None


def check(builder, dataset_config, image_shape, replicated: Sequence[str] = (),
          divided: Sequence[str] = ()) -> None:
  """Refuses memory mode when the splits will not fit: `replicated` splits go whole
  to every device (the train split), `divided` ones are split over all devices (the
  eval split). Runs before any split is read."""
  sizes = {split: split_bytes(builder, split, image_shape) for split in (*replicated, *divided)}
  if None in sizes.values():
    return
  name = f"{dataset_config.name} at {'x'.join(map(str, image_shape))}"
  fix = ("Set --config.dataset.input=stream to read batches from storage while training "
         "instead (or a smaller --config.dataset.image_size, or fewer examples in the split).")
  per_device = (sum(sizes[s] for s in replicated)
                + sum(-(-sizes[s] // jax.device_count()) for s in divided))
  device = device_memory()
  if device is not None and per_device > DEVICE_SHARE * device[0]:
    held = ", ".join([f"split {s!r} whole ({_size(sizes[s])})" for s in replicated]
                     + [f"split {s!r} divided over {jax.device_count()} devices "
                        f"({_size(sizes[s])} in all)" for s in divided])
    raise UserError(
        f"{name} does not fit in device memory: memory mode puts {_size(per_device)} on each "
        f"device ({held}), more than {DEVICE_SHARE:.0%} of the {_size(device[0])} of "
        f"{device[1]}, the rest being for the model and activations. {fix}")
  host = host_memory()
  largest = max(sizes.values(), default=0)
  needed = sum(sizes.values()) + (HOST_COPIES - 1) * largest
  if host is not None and needed > host[0]:
    listed = ", ".join(f"split {s!r} {_size(b)}" for s, b in sizes.items())
    raise UserError(
        f"{name} does not fit in host memory: memory mode decodes {listed} on the host, "
        f"{_size(needed)} at the peak, more than the {_size(host[0])} available "
        f"({host[1]}). {fix}")


def _size(count: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if count >= scale:
      return f"{count / scale:.1f} {unit}"
  return f"{count} bytes"
