"""Reports on finished (or running) workdirs: curves, confusion matrix, Markdown.

  python -m research.report runs/default                 # -> runs/default/report/
  python -m research.report runs/a runs/b --out=reports  # each run + a comparison

For each workdir: `learning_curves.png` (train and evaluation loss and accuracy,
the evaluations labelled with the split they ran on, against steps and against wall
time, from metrics.jsonl), `confusion_matrix.png`
and `per_class_accuracy.png` (the chosen checkpoint, `--step=latest|best|N`, on
the config's eval split, with the dataset's class names) and `report.md`. With
several workdirs also `comparison.md`, `comparison.csv` (the same table
`launch.sweep` writes) and `comparison_curves.png`. Plots use matplotlib's Agg
canvas directly: no display and no pyplot global state.
"""

import csv
import json
import os

import numpy as np
from absl import app, flags, logging

from research.config import config_schema
from research.errors import UserError
from research.run import run_info, run_log

CURVES_FILE = "learning_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
PER_CLASS_FILE = "per_class_accuracy.png"
SUMMARY_FILE = "report.md"
DPI = 100
CURVES_SIZE = (12, 8)  # inches; at DPI: 1200 x 800 pixels
CONFUSION_SIZE = (9, 8)
PER_CLASS_SIZE = (8, 5)

# Columns of comparison tables and the metrics they can be sorted by (lower-is-better ones).
METRICS = ("final_test_accuracy", "best_test_accuracy", "final_test_loss", "final_train_loss",
           "final_train_accuracy")
LOWER_IS_BETTER = {"final_test_loss", "final_train_loss"}

FLAGS = flags.FLAGS


# ---- Reading a workdir ---------------------------------------------------------------

def load_records(workdir: str) -> list[dict]:
  records = run_info.read_metrics(workdir)
  if not records:
    raise UserError(f"{workdir} has no metrics.jsonl records: give a workdir that "
                    "`python -m research.main` trained (at least to its first log line).")
  return records


def with_wall_time(records: list[dict]) -> list[dict]:
  """Adds "wall": seconds since the run began, across resumes.

  `elapsed` restarts at 0 in every session of a resumed run; where it goes back,
  the new session's clock continues from the last time the previous one wrote.
  """
  offset = previous = 0.0
  out = []
  for record in records:
    elapsed = float(record.get("elapsed", 0.0))
    if elapsed < previous:
      offset += previous
    previous = elapsed
    out.append({**record, "wall": offset + elapsed})
  return out


def series(records: list[dict], split: str, key: str, x: str = "step") -> tuple[list, list]:
  """(xs, ys) of `key` in the "train" records, or in the evaluations for split="eval"
  (whichever split they name; older workdirs' "test" records included)."""
  chosen = run_log.evaluations(records) if split == "eval" else [
      r for r in records if r.get("split") == split and not run_log.is_evaluation(r)]
  points = [(r[x], r[key]) for r in chosen if isinstance(r.get(key), (int, float))]
  return [p[0] for p in points], [p[1] for p in points]


def eval_split_of(records: list[dict]) -> str:
  """The split a run's evaluations name ("test" for workdirs older than the naming)."""
  return run_log.final_evaluation(records).get("split", "test")


def summary_row(workdir: str) -> dict:
  """One row of a comparison table: the run's status, length and headline metrics."""
  records = with_wall_time(run_info.read_metrics(workdir))
  summary = run_info.summarize_metrics(records)
  final, best = summary["final"], summary["best"] or {}
  last_eval = run_log.final_evaluation(records)
  info = run_info.read(workdir) or {}
  row = {
      "workdir": workdir,
      "status": info.get("status", "unknown" if records else "not started"),
      "step": max((r["step"] for r in records), default=0),
      "wall_sec": round(records[-1]["wall"], 1) if records else None,
      "eval_split": eval_split_of(records),  # the "test" columns' split, by its own name
      "final_test_accuracy": last_eval.get("accuracy"),
      "best_test_accuracy": best.get("accuracy"),
      "best_step": best.get("step"),
      "final_test_loss": last_eval.get("loss"),
      "final_train_loss": final.get("train", {}).get("loss"),
      "final_train_accuracy": final.get("train", {}).get("accuracy"),
  }
  return row


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
  """Best first by `metric`; rows without it last."""
  if metric not in METRICS:
    raise UserError(f"--metric={metric!r} is not accepted: one of {', '.join(METRICS)}.")
  sign = 1 if metric in LOWER_IS_BETTER else -1
  return sorted(rows, key=lambda r: (r.get(metric) is None,
                                     sign * r[metric] if r.get(metric) is not None else 0))


def write_table(rows: list[dict], csv_path: str, markdown_path: str, title: str) -> None:
  """The same rows as CSV and as a Markdown table (numbers rounded for reading)."""
  columns = list(dict.fromkeys(key for row in rows for key in row))
  with open(csv_path + ".tmp", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(csv_path + ".tmp", csv_path)
  lines = [f"# {title}", "", "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(row.get(column), column) for column in columns) + " |"
            for row in rows]
  _write_text(markdown_path, "\n".join(lines) + "\n")


def _cell(value, column: str = "") -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.1f}" if column.endswith("_sec") else f"{value:.4g}" if abs(value) < 1e-3 \
        else f"{value:.4f}"
  return str(value).replace("|", "\\|")


def _write_text(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


# ---- Plots -------------------------------------------------------------------------------

def _figure(size):
  from matplotlib.figure import Figure  # lazy: 0.5 s import, only for plotting

  return Figure(figsize=size, dpi=DPI, layout="constrained")


def plot_learning_curves(runs: dict[str, list[dict]], path: str) -> None:
  """Loss and accuracy (rows) against steps and wall time (columns); every run in
  `runs` (label -> records with "wall") gets its own colour, train solid, evaluations
  dashed and labelled with the split they ran on."""
  figure = _figure(CURVES_SIZE)
  axes = figure.subplots(2, 2)
  colours = [f"C{i % 10}" for i in range(len(runs))]
  for (label, records), colour in zip(runs.items(), colours):
    prefix = f"{label} " if len(runs) > 1 else ""
    for row, key in enumerate(("loss", "accuracy")):
      for column, x in enumerate(("step", "wall")):
        axis = axes[row][column]
        xs, ys = series(records, "train", key, x)
        axis.plot(xs, ys, color=colour, linewidth=1.2, alpha=0.8, label=f"{prefix}train")
        xs, ys = series(records, "eval", key, x)
        axis.plot(xs, ys, color=colour, linestyle="--", marker="o", markersize=3,
                  label=f"{prefix}{eval_split_of(records)}")
  from matplotlib.ticker import FuncFormatter

  plain = FuncFormatter(lambda value, _: f"{value:g}")
  for row, key in enumerate(("loss", "accuracy")):
    for column, x in enumerate(("step", "wall time (s)")):
      axis = axes[row][column]
      axis.set_xlabel(x)
      axis.set_ylabel(key)
      axis.grid(alpha=0.3)
      if key == "loss":
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(plain)  # 0.3, not 3 x 10^-1
        axis.yaxis.set_minor_formatter(plain)
  axes[0][0].legend(fontsize="small")
  figure.suptitle("Learning curves" + (": " + next(iter(runs)) if len(runs) == 1 else ""))
  figure.savefig(path, dpi=DPI)


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[true class, predicted class]."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (labels, predictions), 1)
  return counts


def plot_confusion(counts: np.ndarray, class_names, title: str, path: str) -> None:
  figure = _figure(CONFUSION_SIZE)
  axis = figure.subplots()
  row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  image = axis.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
  figure.colorbar(image, ax=axis, label="share of the true class")
  ticks = np.arange(len(class_names))
  axis.set_xticks(ticks, class_names, rotation=45, ha="right")
  axis.set_yticks(ticks, class_names)
  axis.set_xlabel("predicted class")
  axis.set_ylabel("true class")
  if len(class_names) <= 20:  # counts stay readable up to about 20 classes
    for true in ticks:
      for predicted in ticks:
        axis.text(predicted, true, str(counts[true, predicted]), ha="center", va="center",
                  fontsize=8, color="white" if row_share[true, predicted] > 0.5 else "black")
  axis.set_title(title)
  figure.savefig(path, dpi=DPI)


def plot_per_class(accuracy: np.ndarray, class_names, title: str, path: str) -> None:
  figure = _figure(PER_CLASS_SIZE)
  axis = figure.subplots()
  positions = np.arange(len(class_names))
  axis.barh(positions, accuracy, color="C0")
  axis.set_yticks(positions, class_names)
  axis.invert_yaxis()
  axis.set_xlim(0, 1)
  axis.set_xlabel("accuracy")
  for position, value in zip(positions, accuracy):
    inside = value > 0.15  # the label fits inside the bar
    axis.text(value - 0.01 if inside else value + 0.01, position, f"{value:.3f}", va="center",
              ha="right" if inside else "left", color="white" if inside else "black", fontsize=8)
  axis.set_title(title)
  figure.savefig(path, dpi=DPI)


# ---- One workdir ---------------------------------------------------------------------

def evaluate_checkpoint(workdir: str, step: str) -> dict:
  """Confusion counts of the chosen checkpoint on the config's eval split."""
  from research.tools.classifier import Classifier

  classifier = Classifier(workdir, step)
  counts = np.zeros((classifier.info.num_classes,) * 2, np.int64)
  for images, labels in eval_examples(classifier.config.dataset):
    predictions = classifier.probabilities(images).argmax(axis=1)
    counts += confusion(labels, predictions, classifier.info.num_classes)
  support = counts.sum(axis=1)
  return {"step": classifier.step, "split": classifier.config.dataset.eval_split,
          "class_names": classifier.info.class_names, "counts": counts,
          "accuracy": float(np.trace(counts) / max(counts.sum(), 1)),
          "per_class": np.diag(counts) / np.maximum(support, 1), "support": support}


def eval_examples(dataset_config, chunk: int = 1000):
  """Yields the eval split as (uint8 images, labels): whole from memory, or `chunk`
  examples at a time from storage when the run streams its data (a streamed dataset
  is never read whole)."""
  from research.data import data_source

  yield from data_source.from_config(dataset_config, train=False).eval_examples(chunk)


def report_workdir(workdir: str, out_dir: str, step: str = "latest",
                   with_confusion: bool = True) -> dict:
  """Writes the plots and report.md of one workdir into `out_dir`; returns its row."""
  records = with_wall_time(load_records(workdir))
  os.makedirs(out_dir, exist_ok=True)
  plot_learning_curves({os.path.basename(os.path.normpath(workdir)): records},
                       os.path.join(out_dir, CURVES_FILE))
  evaluation = None
  if with_confusion:
    evaluation = evaluate_checkpoint(workdir, step)
    title = (f"{os.path.basename(os.path.normpath(workdir))}, step {evaluation['step']}, "
             f"{evaluation['split']} split")
    plot_confusion(evaluation["counts"], evaluation["class_names"], title,
                   os.path.join(out_dir, CONFUSION_FILE))
    plot_per_class(evaluation["per_class"], evaluation["class_names"], title,
                   os.path.join(out_dir, PER_CLASS_FILE))
  row = summary_row(workdir)
  _write_text(os.path.join(out_dir, SUMMARY_FILE),
              _summary_markdown(workdir, row, run_info.read(workdir) or {}, evaluation))
  return row


def _summary_markdown(workdir: str, row: dict, info: dict, evaluation: dict | None) -> str:
  config = info.get("config") or {}
  code = info.get("code") or {}
  devices = info.get("devices") or {}
  versions = info.get("versions") or {}
  split = row["eval_split"]
  facts = [
      ("status", f"{row['status']} at step {row['step']}"),
      (f"final {split} accuracy", _cell(row["final_test_accuracy"])),
      (f"best {split} accuracy", f"{_cell(row['best_test_accuracy'])} (step {row['best_step']})"),
      (f"final {split} loss", _cell(row["final_test_loss"])),
      ("final train loss / accuracy",
       f"{_cell(row['final_train_loss'])} / {_cell(row['final_train_accuracy'])}"),
      ("wall time", f"{row['wall_sec']} s"),
  ]
  if config:
    facts += [("model", config.get("model", {}).get("name")),
              ("optimizer", ", ".join(f"{k}={v}" for k, v in config.get("optimizer", {}).items())),
              ("batch size", config.get("batch_size")),
              ("seed", config.get("seed"))]
  if code:
    facts.append(("code", f"{code.get('git_commit')}{' (dirty)' if code.get('git_dirty') else ''}"))
  if devices:
    facts.append(("devices", f"{devices.get('count')} x {', '.join(devices.get('kinds', []))} "
                             f"in {devices.get('process_count')} process(es)"))
  if versions:
    facts.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
  if info.get("start_time"):
    facts.append(("started / ended", f"{info.get('start_time')} / {info.get('end_time')}"))
  lines = [f"# Report: {workdir}", "", "| | |", "|---|---|"]
  lines += [f"| {name} | {value} |" for name, value in facts]
  lines += ["", "## Learning curves", "", f"![learning curves]({CURVES_FILE})", ""]
  if evaluation:
    lines += [f"## Checkpoint step {evaluation['step']} on the {evaluation['split']} split", "",
              f"Accuracy {evaluation['accuracy']:.4f} on {int(evaluation['support'].sum())} "
              "examples.", "", f"![confusion matrix]({CONFUSION_FILE})", "",
              f"![per-class accuracy]({PER_CLASS_FILE})", "",
              "| class | accuracy | examples | most often mistaken for |", "|---|---|---|---|"]
    counts = evaluation["counts"]
    names = evaluation["class_names"]
    for index, name in enumerate(names):
      mistakes = counts[index].copy()
      mistakes[index] = 0
      confused = (f"{names[int(mistakes.argmax())]} ({int(mistakes.max())})"
                  if mistakes.max() > 0 else "")
      lines.append(f"| {name} | {evaluation['per_class'][index]:.4f} | "
                   f"{int(evaluation['support'][index])} | {confused} |")
  return "\n".join(lines) + "\n"


# ---- Several workdirs ----------------------------------------------------------------

def differing_config(workdirs: list[str]) -> dict[str, dict]:
  """workdir -> {dotted key: value} for the config keys that differ between the runs."""
  flat = {}
  for workdir in workdirs:
    config = (run_info.read(workdir) or {}).get("config")
    if config is None:
      try:
        with open(os.path.join(workdir, "config.json")) as f:
          config = json.load(f)
      except (OSError, ValueError):
        config = {}
    flat[workdir] = config_schema.flatten(config)
  keys = sorted(set().union(*flat.values()))
  varying = [k for k in keys if len({repr(flat[w].get(k)) for w in workdirs}) > 1]
  return {w: {k: flat[w].get(k) for k in varying} for w in workdirs}


def comparison_rows(workdirs: list[str], metric: str) -> list[dict]:
  """Summary rows with the config keys that differ, sorted best first by `metric`."""
  differing = differing_config(workdirs)
  rows = []
  for workdir in workdirs:
    row = summary_row(workdir)
    rows.append({"workdir": row.pop("workdir"), **differing[workdir], **row})
  return sort_rows(rows, metric)


def write_comparison(workdirs: list[str], out_dir: str, metric: str) -> list[dict]:
  os.makedirs(out_dir, exist_ok=True)
  rows = comparison_rows(workdirs, metric)
  write_table(rows, os.path.join(out_dir, "comparison.csv"),
              os.path.join(out_dir, "comparison.md"), f"Comparison, best first by {metric}")
  runs = {_label(w, workdirs): with_wall_time(run_info.read_metrics(w)) for w in workdirs}
  plot_learning_curves({label: records for label, records in runs.items() if records},
                       os.path.join(out_dir, "comparison_curves.png"))
  return rows


def _label(workdir: str, workdirs: list[str]) -> str:
  """The shortest name that tells the runs apart: the path below their common folder."""
  common = os.path.commonpath([os.path.abspath(w) for w in workdirs]) if len(workdirs) > 1 else ""
  return os.path.relpath(os.path.abspath(workdir), common) if common else os.path.basename(
      os.path.normpath(workdir))


# ---- Command line --------------------------------------------------------------------


def run(workdirs: list[str], out: str, step: str, with_confusion: bool, metric: str) -> list[str]:
  """Writes every report; returns the folders written."""
  written = []
  for workdir in workdirs:
    if out and len(workdirs) > 1:
      out_dir = os.path.join(out, _label(workdir, workdirs))
    else:
      out_dir = out or os.path.join(workdir, "report")
    report_workdir(workdir, out_dir, step, with_confusion)
    written.append(out_dir)
  if len(workdirs) > 1:
    out_dir = out or os.path.commonpath([os.path.abspath(w) for w in workdirs])
    write_comparison(workdirs, out_dir, metric)
    written.append(out_dir)
  return written


def _define_flags() -> None:
  """Flags of the command line only, so that importing this module defines none."""
  flags.DEFINE_string("out", "", "Output folder. Default: WORKDIR/report for each run, and "
                      "the runs' common parent folder for the comparison of several.")
  flags.DEFINE_string("step", "latest", "Checkpoint to evaluate: 'latest', 'best' or a step.")
  flags.DEFINE_bool("confusion", True,
                    "Evaluate the checkpoint for a confusion matrix (needs the data).")
  flags.DEFINE_string("metric", "final_test_accuracy",
                      f"Sort the comparison by: {', '.join(METRICS)}.")


def main(argv):
  logging.set_verbosity(logging.ERROR)  # Orbax's read-only notes are not news here
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("Give one or more workdirs, e.g. python -m research.report runs/default")
  try:
    for folder in run(workdirs, FLAGS.out, FLAGS.step, FLAGS.confusion, FLAGS.metric):
      print(f"Wrote {folder}")
  except UserError as e:
    e.exit()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
