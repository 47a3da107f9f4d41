"""`make bench-input`: images/s of the streamed input, old thread path against worker processes.

  python -m research.bench_input

Photographs at ImageNet's typical size (500 x 375, JPEG quality 90), cut from the
real photos scikit-image ships (`skimage.data`) at random positions and scales, are
written through TFDS's array_record path (a GeneratorBasedBuilder, as imagenet2012
is prepared) into --photos_dir. Then, in one run, side by side:

  decode          one core, no pipeline: the old decode (TFDS's whole decode, then
                  resize) and the new one (Inception crop, DCT-scaled decode), timed in
                  CPU seconds of this process, so that other load on the machine does
                  not count (images per CPU-second = img/s of one idle core);
  threads (old)   the path before worker processes: one grain element per batch,
                  decoded whole by TFDS's decoder and resized (shorter side, centre
                  crop) in a pool of threads of the trainer process;
  workers=1, 2    research/data/stream_input.py: per-example Inception crops from the
                  original image (DCT-scaled JPEG decode), in 1 and 2 processes;
  ceiling         the trainer's main thread alone, at batch --ceiling_batch: the real
                  TrainStream over batches that cost nothing to decode, taken from
                  grain and put on the devices: the most images/s the trainer can take
                  in whatever the workers' speed; also per CPU-second of the trainer's
                  process (its own cost, whatever else loads the machine).

Each is timed over --steps batches after one warm-up batch (worker start-up
excluded), and printed with images/s per core used. The load average is printed:
on a shared machine the figures are only as good as the idle cores.
"""

import io
import os
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("photos_dir", "build/bench_input", "where the photographs are prepared")
flags.DEFINE_integer("examples", 1024, "photographs in the dataset")
flags.DEFINE_integer("image_size", 224, "crop size")
flags.DEFINE_integer("batch_size", 128, "batch of the throughput runs")
flags.DEFINE_integer("steps", 16, "timed batches per run")
flags.DEFINE_integer("ceiling_batch", 1024, "batch of the main-thread ceiling")
flags.DEFINE_string("runs", "decode,threads,workers=1,workers=2,ceiling", "which runs, in order")
FLAGS = flags.FLAGS

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
          "hubble_deep_field")
SIZE = (500, 375)  # width, height: ImageNet's most common shape
QUALITY = 90


def photographs(count: int, seed: int = 0):
  """`count` JPEG bytes: random 4:3 windows of skimage's photos, resized to 500 x 375."""
  import skimage.data
  from PIL import Image

  sources = []
  for name in PHOTOS:
    image = getattr(skimage.data, name, None)
    if image is not None:
      pixels = image()
      if pixels.ndim == 3 and pixels.shape[-1] == 3:
        sources.append(Image.fromarray(pixels))
  rng = np.random.default_rng(seed)
  for index in range(count):
    source = sources[index % len(sources)]
    width = int(source.width * rng.uniform(0.6, 1.0))
    height = min(source.height, width * 3 // 4)
    width = height * 4 // 3
    left = int(rng.integers(0, source.width - width + 1))
    top = int(rng.integers(0, source.height - height + 1))
    window = source.resize(SIZE, Image.BICUBIC, box=(left, top, left + width, top + height))
    if rng.integers(2):
      window = window.transpose(Image.FLIP_LEFT_RIGHT)
    encoded = io.BytesIO()
    window.save(encoded, format="JPEG", quality=QUALITY)
    yield encoded.getvalue()


def prepare(data_dir: str, count: int):
  """The photographs as a TFDS dataset in array_record files (built once per count)."""
  import tensorflow_datasets as tfds

  class BenchPhotos(tfds.core.GeneratorBasedBuilder):
    """Photographs of 500 x 375 pixels, JPEG quality 90."""

    VERSION = tfds.core.Version(f"1.0.{count}")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=len(PHOTOS))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for index, encoded in enumerate(photographs(count)):
        yield index, {"image": encoded, "label": index % len(PHOTOS)}

  builder = BenchPhotos(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder


def _dataset_config(builder, data_dir: str, image_size: int, workers: int):
  import ml_collections

  return ml_collections.ConfigDict({
      "name": f"{builder.name}:{builder.version}", "data_dir": data_dir, "train_split": "train",
      "eval_split": "train", "image_size": image_size, "input": "stream", "workers": workers,
      "reader_threads": 0, "crop_fraction": 0.875, "min_crop_area": 0.08,
      "max_crop_area": 1.0})


_LAST_CPU_RATE = [0.0]  # images per CPU-second of this process in the last _timed run


def _timed(batches, steps: int, batch_size: int) -> float:
  """images/s over `steps` batches of the iterator, after one warm-up batch; the rate
  per CPU-second of this process (its threads, not its worker processes) is kept in
  _LAST_CPU_RATE."""
  next(batches)
  started, cpu_started = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(batches)
  _LAST_CPU_RATE[0] = steps * batch_size / max(time.process_time() - cpu_started, 1e-9)
  return steps * batch_size / (time.perf_counter() - started)


def run_threads(builder, image_size, batch_size, steps) -> float:
  """The old path: a step's batch per grain element, TFDS-decoded whole and resized."""
  import grain

  from research.data import datasets, stream_input

  source = datasets.open_split(builder, "train")
  count = len(source)

  def read_step(step):
    indices = datasets.batch_indices(0, int(step), 1, batch_size, count)[0]
    split = datasets.read_examples(builder, "train", source, [int(i) for i in indices], image_size)
    return split.images, split.labels

  threads = stream_input.reader_threads(0)
  iterator = iter(grain.MapDataset.range(steps + 1).map(read_step).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
  try:
    return _timed(iterator, steps, batch_size)
  finally:
    iterator.close()


def run_workers(builder, data_dir, image_size, batch_size, steps, workers) -> float:
  """The new path, as training streams it: Inception crops in `workers` processes."""
  from research import mesh as mesh_lib
  from research.data import data_source, stream_input

  source = data_source.from_config(_dataset_config(builder, data_dir, image_size, workers))
  stream = stream_input.TrainStream(source.train, mesh_lib.make_mesh(), seed=0,
                                    batch_size=batch_size, total_steps=steps + 1, start_step=0,
                                    log_every=1, crop="inception", workers=workers)
  try:
    pieces = (piece for step in range(steps + 1) for piece in stream.batches(step, step + 1))
    return _timed(pieces, steps, batch_size)
  finally:
    stream.close()


def run_decode(builder, data_dir, image_size, batch_size, steps) -> tuple[float, float]:
  """(old, new) images per CPU-second of one core decoding in this process."""
  from research.data import datasets, data_source

  count = (steps + 1) * batch_size
  source = datasets.open_split(builder, "train")
  reader = data_source.from_config(_dataset_config(builder, data_dir, image_size, 0)).train
  indices = datasets.batch_indices(0, 0, 1, count, len(source))[0] if count <= len(source) else (
      np.arange(count) % len(source))
  rates = []
  for decode in (lambda rows: datasets.read_examples(builder, "train", source, rows, image_size),
                 lambda rows: reader.read(rows, "inception", [(0, 0, int(i)) for i in rows])):
    decode([int(i) for i in indices[:batch_size]])  # warm-up
    started = time.process_time()
    for first in range(batch_size, count, batch_size):
      decode([int(i) for i in indices[first:first + batch_size]])
    rates.append((count - batch_size) / (time.process_time() - started))
  return tuple(rates)


class _FreeReader:
  """Examples that cost nothing to decode: the same array for every step."""

  def __init__(self, batch_size, image_size):
    self.image_shape = (image_size, image_size, 3)
    self.batch = (np.zeros((batch_size, *self.image_shape), np.uint8),
                  np.zeros((batch_size,), np.int32))

  def __len__(self):
    return 1000 * len(self.batch[1])

  def read(self, indices, crop, seeds):
    return self.batch


def run_ceiling(image_size, batch_size, steps, to_devices: bool = True) -> float:
  """The trainer's main thread alone: TrainStream.batches over batches that cost nothing
  to decode (computed in threads), put on the devices (or, without `to_devices`, only
  taken from grain: the pipeline's own cost, without the copy to device memory)."""
  import jax

  from research import mesh as mesh_lib
  from research.data import stream_input

  stream = stream_input.TrainStream(_FreeReader(batch_size, image_size), mesh_lib.make_mesh(),
                                    seed=0, batch_size=batch_size, total_steps=steps + 1,
                                    start_step=0, log_every=1, workers=0, threads=2)
  try:
    if to_devices:
      pieces = (jax.block_until_ready(piece) for step in range(steps + 1)
                for piece in stream.batches(step, step + 1))
    else:
      pieces = (next(stream._reader) for _ in range(steps + 1))
    return _timed(pieces, steps, batch_size)
  finally:
    stream.close()


def main(argv):
  del argv
  from research.data import stream_input

  builder = prepare(FLAGS.photos_dir, FLAGS.examples)
  cores = stream_input.cores()
  print(f"Photographs: {FLAGS.examples} of {SIZE[0]}x{SIZE[1]}, JPEG quality {QUALITY}, "
        f"{builder.info.dataset_size / FLAGS.examples / 1e3:.0f} kB each; crops of "
        f"{FLAGS.image_size} px; {cores} cores; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} before.")
  rows = []
  for name in FLAGS.runs.split(","):
    if name == "decode":
      old, new = run_decode(builder, FLAGS.photos_dir, FLAGS.image_size, FLAGS.batch_size,
                            FLAGS.steps)
      rows.append(("decode, old (1 core, CPU time: whole decode + resize)", old, 1))
      rows.append(("decode, new (1 core, CPU time: Inception crop, draft)", new, 1))
    elif name == "threads":
      rate = run_threads(builder, FLAGS.image_size, FLAGS.batch_size, FLAGS.steps)
      rows.append((f"threads (old: {stream_input.reader_threads(0)} threads, whole decode "
                   "+ resize)", rate, cores))
    elif name.startswith("workers="):
      workers = int(name.split("=")[1])
      rate = run_workers(builder, FLAGS.photos_dir, FLAGS.image_size, FLAGS.batch_size,
                         FLAGS.steps, workers)
      rows.append((f"workers={workers} (Inception crop, draft decode)", rate, min(workers, cores)))
    elif name == "ceiling":
      rate = run_ceiling(FLAGS.image_size, FLAGS.ceiling_batch, FLAGS.steps)
      rows.append((f"ceiling (main thread, batch {FLAGS.ceiling_batch}, nothing decoded)", rate,
                   1))
      # The same in CPU time: what the trainer's process spends per image, whatever else
      # runs on the machine.
      rows.append((f"ceiling, CPU time (batch {FLAGS.ceiling_batch})", _LAST_CPU_RATE[0], 1))
      rate = run_ceiling(FLAGS.image_size, FLAGS.ceiling_batch, FLAGS.steps, to_devices=False)
      rows.append((f"ceiling without the copy to devices (batch {FLAGS.ceiling_batch})", rate,
                   1))
    else:
      raise app.UsageError(f"--runs: unknown run {name!r}; accepted: threads, workers=N, "
                           "ceiling")
  width = max(len(label) for label, _, _ in rows)
  print(f"{'run':<{width}}  {'img/s':>9}  {'img/s/core':>10}")
  for label, rate, used in rows:
    print(f"{label:<{width}}  {rate:9.0f}  {rate / used:10.0f}")
  rates = {label.split(" ")[0]: rate for label, rate, _ in rows}
  if "workers=1" in rates and "workers=2" in rates:
    print(f"workers 1 -> 2: {rates['workers=2'] / rates['workers=1']:.2f}x")
  print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} after.")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
