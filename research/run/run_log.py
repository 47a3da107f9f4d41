"""Where a run's numbers go: metrics.jsonl, TensorBoard and the console.

Records: training ones say `"split": "train"`; evaluations name the split they ran on
(`"split": "test"`, or `"train[90%:]"` for a study's validation hold-out) and carry
`"kind": "eval"`. Records written before evaluations were named say `"split": "test"`
and have no kind; `is_evaluation` reads both, and the lines of eval.jsonl (`--mode=eval`).
TensorBoard tags are `SPLIT/METRIC`, the split spelt in TensorBoard's tag alphabet
(`split_tag`). `read_records` and `final_evaluation` are how every other module reads the
records back.

Only process 0 writes. On resume, metrics.jsonl is cut back to the restored
step first, so the file reads exactly as if the run had never stopped; then the
TensorBoard event files are made to hold exactly its points (TensorBoard has no
delete: a killed run's points past the checkpoint would show twice, and points it
had not flushed would be missing).
"""

import json
import math
import os
import re
import shutil
import sys
import time

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"  # one line per `--mode=eval` (train.evaluate_checkpoint)


class RunLog:

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._writer = None
    self._file = None
    if not self.enabled:
      return
    self._truncate_after(resume_step)
    tensorboard_dir = os.path.join(workdir, "tensorboard")
    match_tensorboard_to(tensorboard_dir, _scalar_points(self.path))
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # lazy: 0.3 s import

    self._writer = SummaryWriter(tensorboard_dir)

  def _truncate_after(self, step: int) -> None:
    """Drops records newer than `step` (they will be written again, identically) and
    lines that are not records (a crash's cut line, damaged bytes), with a warning."""
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      lines = [line for line in f if line.strip()]
    records = [_record_of(line) for line in lines]
    kept = [line for line, record in zip(lines, records)
            if record is not None and record["step"] <= step]
    damaged = sum(record is None for record in records)
    if damaged:
      logging.warning("%s: dropped %d damaged line(s); the records around them are kept.",
                      self.path, damaged)
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "wb") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, split: str, step: int, epoch: float, elapsed: float, **values) -> None:
    """One event: a line in metrics.jsonl and scalars in TensorBoard."""
    if not self.enabled:
      return
    record = {"step": step, "epoch": round(epoch, 4), "split": split,
              **{k: _plain(v) for k, v in values.items()}, "elapsed": round(elapsed, 3)}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for tag, value in _scalars(record).items():
      self._writer.add_scalar(tag, value, step)
    self._writer.flush()  # TensorBoard shows each log step as it comes, even after a kill

  def write_evaluation(self, split: str, step: int, epoch: float, elapsed: float,
                       **values) -> None:
    """An evaluation on `split` (its own name, e.g. "test" or "train[90%:]")."""
    self.write(split, step, epoch, elapsed, kind=EVALUATION, **values)

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._writer:
      self._writer.close()


EVALUATION = "eval"


def is_evaluation(record: dict) -> bool:
  """An evaluation record: today's form, a line of eval.jsonl (it names the checkpoint it
  evaluated), or a record of a workdir written before splits were named."""
  if "kind" in record:
    return record["kind"] == EVALUATION
  return "checkpoint" in record or record.get("split") == "test"


def evaluations(records: list[dict]) -> list[dict]:
  return [record for record in records if is_evaluation(record)]


def final_evaluation(records: list[dict], split: str | None = None) -> dict:
  """The last evaluation among `records` (`read_records`), of `split` when one is named
  (by the name the run gave it, e.g. "test[:1000]"); {} when there is none."""
  found = [record for record in evaluations(records)
           if split is None or record.get("split") == split]
  return found[-1] if found else {}


def split_tag(split: str) -> str:
  """A split's name in TensorBoard's tag alphabet (letters, digits, _ - . /):
  'test' stays, 'train[90%:]' -> 'train.90pct_to_end', 'train[:10%]' -> 'train.start_to_10pct'."""
  text = re.sub(r"\[([^\]:]*):([^\]]*)\]",
                lambda m: f".{m.group(1) or 'start'}_to_{m.group(2) or 'end'}", split)
  text = text.replace("%", "pct")
  return re.sub(r"[^-\w.]", "_", text)


def tag_prefix(record: dict) -> str:
  """The TensorBoard group of a record: "train", or the evaluated split's tag (an
  evaluation on the training split itself is "train_eval", apart from training's)."""
  if not is_evaluation(record):
    return record["split"]
  tag = split_tag(record["split"])
  return "train_eval" if tag == "train" else tag


def _scalars(record: dict) -> dict:
  """{TensorBoard tag: value} of one metrics.jsonl record."""
  prefix = tag_prefix(record)
  return {f"{prefix}/{key}": value for key, value in record.items()
          if key not in ("step", "split", "epoch", "elapsed", "kind")
          and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _scalar_points(path: str) -> dict:
  """{(tag, step): value} of every scalar in metrics.jsonl."""
  points = {}
  for record in read_records(path):
    for tag, value in _scalars(record).items():
      points[(tag, record["step"])] = value
  return points


def match_tensorboard_to(directory: str, points: dict) -> None:
  """Makes the event files in `directory` hold exactly `points` ({(tag, step): value},
  metrics.jsonl's), one point per tag and step, keeping the wall times already written.

  Read with TensorBoard's own TensorFlow-free record reader, written with its record
  writer. The result replaces the first (oldest) event file, so it is read before the
  files this run writes next; the replacement is atomic (written aside, then renamed)
  and happens before the other old files are removed: a crash in between leaves
  duplicates that the next start removes the same way.
  """
  if not os.path.isdir(directory):
    return
  old_files = sorted(os.path.join(directory, name) for name in os.listdir(directory)
                     if "tfevents" in name)
  if not old_files:
    return
  from tensorboard.compat.proto import event_pb2

  written = {}  # (tag, step) -> (wall time, value) of the point last written for it
  count = 0
  for path in old_files:
    for event in _read_events(path):
      for value in event.summary.value:
        count += 1
        written[(value.tag, event.step)] = (event.wall_time, value.simple_value)
  if count == len(written) and written.keys() == points.keys() and all(
      written[key][1] == np.float32(value) for key, value in points.items()):
    return  # already exactly metrics.jsonl's points
  now = time.time()
  events = []
  for (tag, step), value in sorted(points.items(), key=lambda item: (item[0][1], item[0][0])):
    # A point logged but never flushed by a killed process gets the time of this start.
    wall_time = written.get((tag, step), (now,))[0]
    event = event_pb2.Event(wall_time=wall_time, step=step)
    event.summary.value.add(tag=tag, simple_value=value)
    events.append(event)
  _write_events(old_files[0], events, now)
  for path in old_files[1:]:
    os.remove(path)


def _read_events(path: str):
  """The Event protos of one file; a record cut short by a kill ends it."""
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

  reader = pywrap_tensorflow.PyRecordReader_New(path)
  try:
    while True:
      try:
        reader.GetNext()
      except (errors.OutOfRangeError, errors.DataLossError):
        return
      yield event_pb2.Event.FromString(reader.record())
  finally:
    reader.file_handle.close()


def _write_events(path: str, events: list, wall_time: float) -> None:
  """Replaces the event file `path` by `events` (after the file-version record)."""
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.record_writer import RecordWriter

  # No "tfevents" in the name: TensorBoard skips it while it is written.
  temporary = os.path.join(os.path.dirname(path), ".rewritten.tmp")
  with open(temporary, "wb") as f:
    writer = RecordWriter(f)
    writer.write(event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2")
                 .SerializeToString())
    for event in events:
      writer.write(event.SerializeToString())
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def read_records(path: str) -> list[dict]:
  """The records of a metrics.jsonl ([] when there is none). Lines that are not records
  (a line cut short by a crash, damaged bytes) are skipped: one bad line never costs a run."""
  try:
    with open(path, "rb") as f:
      return [record for record in map(_record_of, f) if record is not None]
  except FileNotFoundError:
    return []


def _record_of(line: bytes) -> dict | None:
  """A line's record: a JSON object with an integer step; None for anything else."""
  try:
    record = json.loads(line)
  except ValueError:  # UnicodeDecodeError included
    return None
  if not isinstance(record, dict) or type(record.get("step")) is not int:
    return None
  return record


def _plain(value):
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float):
    return value if math.isfinite(value) else str(value)
  return value


class Progress:
  """Speed, ETA and input wait of the training steps, for the console.

  In a terminal: one progress bar per phase (the steps up to the next
  evaluation) with steps/s, images/s, loss, accuracy, the share of time spent
  waiting for input, and ETAs. Elsewhere (logs, CI): a log line at every
  `log_every_steps`. Input time is the host work that prepares a chunk's batch
  before the compiled call; compute is the call itself, so a slow input
  pipeline shows up as a large input share.
  """

  def __init__(self, plan, batch_size: int, start_step: int, stream=None):
    self.plan = plan
    self.total_steps = plan.total_steps
    self.batch_size = batch_size
    self._stream = stream or sys.stderr
    self.bars = jax.process_index() == 0 and _is_terminal(self._stream)
    self._bar = None
    self._last_step = self._chunk_step = start_step
    self._input_sec = self._compute_sec = 0.0  # since the last update()

  def chunk_done(self, step: int, input_sec: float, compute_sec: float, loss: float,
                 accuracy: float) -> None:
    """After each compiled call: accounts its time and moves the bar (cheap)."""
    self._input_sec += input_sec
    self._compute_sec += compute_sec
    if not self.bars:
      return
    steps_per_sec = (step - self._chunk_step) / max(input_sec + compute_sec, 1e-9)
    phase_start, phase_end = self._phase(self._chunk_step)
    if self._bar is None:
      from tqdm import tqdm  # lazy: only terminals draw bars

      size = shutil.get_terminal_size((120, 24))
      self._bar = tqdm(total=phase_end - phase_start, initial=self._chunk_step - phase_start,
                       desc=self._phase_name(phase_start, phase_end), file=self._stream,
                       ncols=size.columns or 120, nrows=size.lines or 24,  # 0 in bare ptys
                       leave=True, mininterval=0,
                       bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                  "[{elapsed}<{remaining}{postfix}]")
    share = input_sec / max(input_sec + compute_sec, 1e-9)
    remaining = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    self._bar.set_postfix_str(
        f"loss {loss:.4f} acc {accuracy:.4f} | {steps_per_sec:.1f} steps/s "
        f"{steps_per_sec * self.batch_size:.0f} img/s | input {share:.0%} | "
        f"run ETA {format_eta(remaining)}", refresh=False)
    self._bar.update(step - self._chunk_step)
    self._chunk_step = step
    if step >= phase_end:
      self.end_phase()

  def update(self, step: int) -> dict:
    """At a log step: speed, ETA and input/compute seconds since the previous one."""
    # Training time only (input + compute of the compiled calls): evaluations and
    # checkpoints between two log steps do not count against the speed.
    seconds = max(self._input_sec + self._compute_sec, 1e-9)
    steps_per_sec = (step - self._last_step) / seconds
    self._last_step = step
    remaining = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    speed = {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self.batch_size,
             "eta_sec": remaining, "input_sec": self._input_sec, "compute_sec": self._compute_sec}
    self._input_sec = self._compute_sec = 0.0
    return speed

  def log_line(self, step: int, train_metrics: dict, speed: dict) -> None:
    """The console line of a log step; a terminal shows the bar instead."""
    if self.bars:
      return
    console("step %d/%d epoch %.2f | train loss %.4f acc %.4f | %.1f steps/s %.0f img/s | "
            "input %.0f ms compute %.2f s | ETA %s", step, self.total_steps, self.plan.epoch(step),
            train_metrics["loss"], train_metrics["accuracy"], speed["steps_per_sec"],
            speed["images_per_sec"], 1000 * speed["input_sec"], speed["compute_sec"],
            format_eta(speed["eta_sec"]))

  def end_phase(self) -> None:
    """Closes the current bar (before an evaluation or the end of the run prints)."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def _phase(self, step: int) -> tuple[int, int]:
    every = self.plan.eval_every
    start = step // every * every
    return start, min(start + every, self.total_steps)

  def _phase_name(self, start: int, end: int) -> str:
    if self.plan.eval_every == self.plan.steps_per_epoch:
      epochs = -(-self.total_steps // self.plan.steps_per_epoch)
      return f"epoch {start // self.plan.steps_per_epoch + 1}/{epochs}"
    return f"steps {start}-{end}/{self.total_steps}"


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # a closed or unusual stream
    return False


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def evaluation_line(step: int, epoch: float, split: str, found: dict) -> str:
  """The console line of an evaluation: every registered metric, on the named split."""
  from research import metrics  # lazy: it imports JAX's numpy

  values = " ".join(f"{'acc' if name == 'accuracy' else name} {found[name]:.4f}"
                    for name in metrics.METRICS if name in found)
  return (f"step {step} epoch {epoch:.2f} | {split} {values} ({found['num_examples']} examples) "
          f"| params {found['params_fingerprint']}")


def console(message: str, *args) -> None:
  """A line for the user (process 0 only); main.py decides how it looks."""
  if jax.process_index() == 0:
    logging.info(message, *args)
