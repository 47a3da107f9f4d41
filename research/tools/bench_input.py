"""`make bench-input`: images/s of the streamed input, old thread path against worker processes.

  python -m research.bench_input

Photographs at ImageNet's typical size (500 x 375, JPEG quality 90), cut from the
real photos scikit-image ships (`skimage.data`) at random positions and scales, are
written through TFDS's array_record path (a GeneratorBasedBuilder, as imagenet2012
is prepared) into --photos_dir. Then, in one run, side by side:

  decode          one core, no pipeline, in CPU seconds of this process (other load
                  on the machine does not count: images per CPU-second = img/s of
                  one idle core): the old decode (TFDS's whole decode, then resize);
                  the worker's own code (record, header, Inception crop, OpenCV's
                  DCT-scaled decode, resize); and the candidate decoders on the same
                  bytes and boxes: OpenCV's decode alone, its whole decode + crop +
                  resize, and the worker's decode_box (the worker's code without the
                  record); PIL's whole decode + crop, its decode alone, and the
                  workers' PIL code until 2026-12-03 (`draft` decode, antialiased
                  resize); TensorFlow's `decode_and_crop_jpeg` (+ resize, eager and in
                  a tf.function); and simplejpeg (libjpeg-turbo without PIL) where it
                  is installed;
  threads (old)   the path before worker processes: one grain element per batch,
                  decoded whole by TFDS's decoder and resized (shorter side, centre
                  crop) in a pool of threads of the trainer process;
  workers=1, 2    research/data/stream_input.py: per-example Inception crops from the
                  original image (OpenCV's DCT-scaled JPEG decode), in 1 and 2 processes;
  ceiling         the trainer's main thread alone, at batch --ceiling_batch: the real
                  TrainStream over batches that cost nothing to decode, taken from
                  grain and given to the devices: the most images/s the trainer can
                  take in whatever the workers' speed. Four forms: the hand-off as
                  the CPU devices take it (aliased: no transfer, the main thread's own
                  work: the figure that matters on an accelerator, where the transfer
                  runs on the copy engines); the same through 2 worker processes and
                  shared memory; with a copy into device memory (what the CPU
                  backend's transfer costs); and taken from grain only. Their
                  CPU-second column counts the trainer's process alone.

Each is timed over --steps batches after one warm-up batch (worker start-up
excluded). Columns: img/s of wall-clock time; that per core used; and images per
CPU-second of every process involved (the trainer's and its workers'; the ceiling:
the trainer's), which the other load on a shared machine disturbs far less. The
load average is printed.
"""

import io
import math
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


def _cpu_seconds(children: bool = True) -> float:
  """CPU seconds used so far by this process and (`children`) its child processes
  (grain's workers): those reaped (os.times) and those not (read from /proc)."""
  total = time.process_time()  # this process, to the nanosecond
  if not children:
    return total
  reaped = os.times()  # in clock ticks (10 ms)
  total += reaped.children_user + reaped.children_system
  ticks = os.sysconf("SC_CLK_TCK")
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # reaped meanwhile: os.times counts it from now on
      continue
    if int(fields[1]) == os.getpid():  # fields[1] is the parent's pid
      total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
  return total


def _timed(batches, steps: int, batch_size: int, children: bool = True) -> tuple[float, float]:
  """(images/s of wall-clock time, images per CPU-second of this process and, with
  `children`, its workers) over `steps` batches of the iterator, after one warm-up batch."""
  next(batches)
  started, cpu_started = time.perf_counter(), _cpu_seconds(children)
  for _ in range(steps):
    next(batches)
  images = steps * batch_size
  cpu = _cpu_seconds(children) - cpu_started
  return images / (time.perf_counter() - started), images / max(cpu, 1e-9)


def run_threads(builder, image_size, batch_size, steps) -> tuple[float, float]:
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


def run_workers(builder, data_dir, image_size, batch_size, steps, workers) -> tuple[float, float]:
  """The new path, as training streams it: Inception crops in `workers` processes."""
  from research import mesh as mesh_lib
  from research.data import data_source, stream_input

  source = data_source.from_config(_dataset_config(builder, data_dir, image_size, workers))
  # Steps past the timed ones keep every worker busy to the end of the timing, so that
  # the CPU seconds counted are those of the timed batches (up to one batch a worker).
  stream = stream_input.TrainStream(source.train, mesh_lib.make_mesh(), seed=0,
                                    batch_size=batch_size, total_steps=steps + 1 + 2 * workers,
                                    start_step=0, log_every=1, crop="inception", workers=workers)
  try:
    pieces = (piece for step in range(steps + 1) for piece in stream.batches(step, step + 1))
    return _timed(pieces, steps, batch_size)
  finally:
    stream.close()


def _boxes(encoded: list[bytes], seed: int = 0) -> list[tuple]:
  """The Inception crop box of each image, as the workers draw them for step 0."""
  from research.data import image_crops

  boxes = []
  for row, image in enumerate(encoded):
    height, width = image_crops.image_shape(image)
    boxes.append(image_crops.inception_box(np.random.default_rng((seed, 0, row)), height, width))
  return boxes


def _decoders(image_size: int) -> dict:
  """Candidate decoders: label -> function(encoded bytes, box) -> pixels, each on one
  core. Those whose library is missing are left out."""
  import cv2
  from PIL import Image

  from research.data import image_crops

  def opencv_whole(encoded, box):
    top, left, height, width = (int(round(v)) for v in box)
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.resize(image[top:top + height, left:left + width],
                                   (image_size, image_size), interpolation=cv2.INTER_LINEAR),
                        cv2.COLOR_BGR2RGB)

  def pil_draft(encoded, box):
    """The workers' code until 2026-12-03: header, `draft` (DCT-scaled) decode of the
    box's scale, antialiased bilinear resize of the box."""
    top, left, height, width = box
    image = Image.open(io.BytesIO(encoded))
    full_height, full_width = image.height, image.width
    image.draft("RGB", (math.ceil(full_width * image_size / width),
                        math.ceil(full_height * image_size / height)))
    image = image.convert("RGB")
    scale_y, scale_x = image.height / full_height, image.width / full_width
    return np.asarray(image.resize((image_size, image_size), Image.BILINEAR, box=(
        left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)))

  def pil_whole(encoded, box):
    top, left, height, width = box
    image = Image.open(io.BytesIO(encoded)).convert("RGB")
    return np.asarray(image.resize((image_size, image_size), Image.BILINEAR,
                                   box=(left, top, left + width, top + height)))

  def pil_decode(encoded, box):
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))

  decoders = {
      "OpenCV: decode_box (the worker's code, no record read)":
          lambda encoded, box: image_crops.decode_box(encoded, box, image_size, 3),
      "OpenCV: whole decode + Inception crop, resize": opencv_whole,
      "OpenCV: decode alone (no crop, no resize)":
          lambda encoded, box: cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR),
      "PIL: draft decode + Inception crop, resize (the workers' code before)": pil_draft,
      "PIL: whole decode + Inception crop, resize": pil_whole,
      "PIL: decode alone (no crop, no resize)": pil_decode}
  try:
    import simplejpeg
  except ImportError:
    print("simplejpeg is not installed: its rows are left out.")
  else:
    def simplejpeg_crop(encoded, box):
      top, left, height, width = box
      image = Image.fromarray(simplejpeg.decode_jpeg(encoded, colorspace="RGB"))
      return np.asarray(image.resize((image_size, image_size), Image.BILINEAR,
                                     box=(left, top, left + width, top + height)))

    decoders["simplejpeg: decode + Inception crop, PIL resize"] = simplejpeg_crop
    decoders["simplejpeg: decode alone"] = (
        lambda encoded, box: simplejpeg.decode_jpeg(encoded, colorspace="RGB"))
  import tensorflow as tf

  try:  # one core, as a worker would have; fails if TensorFlow already started its pools
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:
    print("TensorFlow's thread pools were already started: its rows may use more than one core.")

  def tf_crop(encoded, box):
    crop = tf.image.decode_and_crop_jpeg(encoded, [int(round(v)) for v in box], channels=3)
    return tf.image.resize(crop, (image_size, image_size), antialias=True).numpy()

  @tf.function
  def tf_crop_graph(encoded, box):
    crop = tf.image.decode_and_crop_jpeg(encoded, box, channels=3)
    return tf.image.resize(crop, (image_size, image_size), antialias=True)

  decoders["TF: decode_and_crop_jpeg + resize, eager"] = tf_crop
  decoders["TF: decode_and_crop_jpeg + resize, tf.function"] = (
      lambda encoded, box: tf_crop_graph(
          tf.constant(encoded), tf.constant([int(round(v)) for v in box], tf.int32)).numpy())
  decoders["TF: decode_and_crop_jpeg alone, eager"] = (
      lambda encoded, box: tf.image.decode_and_crop_jpeg(
          encoded, [int(round(v)) for v in box], channels=3).numpy())
  return decoders


def run_decode(builder, data_dir, image_size, batch_size, steps) -> list[tuple[str, float]]:
  """(label, images per CPU-second) of one core decoding in this process: the old
  decode, the worker's own code, then each candidate decoder on the same bytes and
  boxes (the records read beforehand)."""
  from research.data import datasets, data_source

  count = min((steps + 1) * batch_size, builder.info.splits["train"].num_examples)
  source = datasets.open_split(builder, "train")
  reader = data_source.from_config(_dataset_config(builder, data_dir, image_size, 0)).train
  indices = [int(i) for i in datasets.batch_indices(0, 0, 1, count, len(source))[0]]
  warm = min(batch_size, count // 4)

  def per_cpu_second(decode) -> float:
    """Images per CPU-second of `decode(positions)`, run over `count` positions."""
    decode(range(warm))
    started = time.process_time()
    for first in range(0, count, batch_size):
      decode(range(first, min(first + batch_size, count)))
    return count / (time.process_time() - started)

  def at(positions):
    return [indices[i] for i in positions]

  rows = [
      ("old: TFDS whole decode + resize, centre crop",
       per_cpu_second(lambda positions: datasets.read_examples(builder, "train", source,
                                                           at(positions), image_size))),
      ("new: the worker's code (record, Inception crop, DCT-scaled decode, resize)",
       per_cpu_second(lambda positions: reader.read(
           at(positions), "inception", [(0, 0, i) for i in positions])))]
  encoded = [bytes(example["image"]) for example in reader.source.__getitems__(indices)]
  boxes = _boxes(encoded)
  for label, decode in _decoders(image_size).items():
    def decode_all(positions, decode=decode):
      for i in positions:
        decode(encoded[i], boxes[i])

    rows.append((label, per_cpu_second(decode_all)))
  return rows


class _FreeReader:
  """Examples that cost nothing to decode: a step's batch is the buffer the workers'
  code would fill (research/data/host_buffers.py), left as it is."""

  def __init__(self, image_size):
    self.image_shape = (image_size, image_size, 3)

  def __len__(self):
    return 1_000_000

  def read(self, indices, crop, seeds, out):
    return out, np.zeros((len(indices),), np.int32)


def run_ceiling(image_size, batch_size, steps, hand_off: str = "alias",
                workers: int = 0) -> tuple[float, float]:
  """The trainer's main thread alone: TrainStream.batches over batches that cost nothing
  to decode (made in 2 threads, or in `workers` processes and passed through shared
  memory), given to the devices as training does (`hand_off` "alias": the CPU devices
  alias the batch, no transfer), then also copied into device memory ("copy": the CPU
  backend's transfer), or only taken from grain ("none"). The CPU-second rate counts
  this process only: the trainer's own cost."""
  import jax

  from research import mesh as mesh_lib
  from research.data import stream_input

  stream = stream_input.TrainStream(_FreeReader(image_size), mesh_lib.make_mesh(), seed=0,
                                    batch_size=batch_size, total_steps=steps + 1,
                                    start_step=0, log_every=1, workers=workers, threads=2)

  def hand_over(piece):
    images, labels, _ = piece
    if hand_off == "copy":
      images = jax.device_put(images, may_alias=False)
    return jax.block_until_ready((images, labels))

  if hand_off == "none":
    pieces = (next(stream._reader) for _ in range(steps + 1))
  else:
    pieces = (hand_over(piece) for step in range(steps + 1)
              for piece in stream.batches(step, step + 1))
  try:
    return _timed(pieces, steps, batch_size, children=False)
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
  rows = []  # (label, img/s wall or None, cores used, images per CPU-second)
  for name in FLAGS.runs.split(","):
    if name == "decode":
      rows += [(f"decode, {label} (1 core)", None, 1, rate)
               for label, rate in run_decode(builder, FLAGS.photos_dir, FLAGS.image_size,
                                             FLAGS.batch_size, FLAGS.steps)]
    elif name == "threads":
      rate, cpu_rate = run_threads(builder, FLAGS.image_size, FLAGS.batch_size, FLAGS.steps)
      rows.append((f"threads (old: {stream_input.reader_threads(0)} threads, whole decode "
                   "+ resize)", rate, cores, cpu_rate))
    elif name.startswith("workers="):
      workers = int(name.split("=")[1])
      rate, cpu_rate = run_workers(builder, FLAGS.photos_dir, FLAGS.image_size,
                                   FLAGS.batch_size, FLAGS.steps, workers)
      rows.append((f"workers={workers} (Inception crop, DCT-scaled decode)", rate,
                   min(workers, cores), cpu_rate))
    elif name == "ceiling":
      batch = FLAGS.ceiling_batch
      for hand_off, workers, label in (
          ("alias", 0, f"ceiling (main thread, batch {batch}; hand-off, no transfer)"),
          ("alias", 2, f"ceiling through 2 worker processes' shared memory (batch {batch})"),
          ("copy", 0, f"ceiling with a copy into device memory (batch {batch})"),
          ("none", 0, f"ceiling, only taken from grain (batch {batch})")):
        rate, cpu_rate = run_ceiling(FLAGS.image_size, batch, FLAGS.steps, hand_off, workers)
        rows.append((label, rate, 1, cpu_rate))
    else:
      raise app.UsageError(f"--runs: unknown run {name!r}; accepted: decode, threads, "
                           "workers=N, ceiling")
  width = max(len(label) for label, *_ in rows)
  print(f"{'run':<{width}}  {'img/s':>9}  {'img/s/core':>10}  {'img/CPU-s':>10}")
  for label, rate, used, cpu_rate in rows:
    wall = ("", "") if rate is None else (f"{rate:.0f}", f"{rate / used:.0f}")
    print(f"{label:<{width}}  {wall[0]:>9}  {wall[1]:>10}  {cpu_rate:10.0f}")
  rates = {label.split(" ")[0]: rate for label, rate, *_ in rows}
  if "workers=1" in rates and "workers=2" in rates:
    print(f"workers 1 -> 2: {rates['workers=2'] / rates['workers=1']:.2f}x")
  print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} after.")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
