"""research.tools.report: learning curves, confusion matrix, Markdown summary, comparisons."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from research.tools import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(steps_and_elapsed):
  out = []
  for step, elapsed in steps_and_elapsed:
    out.append({"step": step, "split": "train", "loss": 2.0 / step, "accuracy": 1 - 1 / step,
                "elapsed": elapsed})
    out.append({"step": step, "split": "test", "loss": 2.5 / step, "accuracy": 0.9 - 1 / step,
                "elapsed": elapsed + 0.5})
  return out


def test_wall_time_continues_across_resumed_sessions():
  # A run stopped after step 20 and resumed: its second session's clock restarts at 0.
  records = _records([(10, 1.0), (20, 2.0), (30, 0.8), (40, 1.8)])
  walls = [r["wall"] for r in report.with_wall_time(records)]
  assert walls == sorted(walls)
  assert walls[4] == pytest.approx(2.5 + 0.8)


def test_curves_and_summaries_name_the_evaluated_split_and_read_older_records():
  named = [{**r, "split": "train[90%:]", "kind": "eval"} if r["split"] == "test" else r
           for r in _records([(10, 1.0), (20, 2.0)])]
  assert report.eval_split_of(named) == "train[90%:]"
  assert report.series(named, "eval", "accuracy") == ([10, 20], [0.8, 0.85])
  assert report.series(named, "train", "loss") == ([10, 20], [0.2, 0.1])
  older = _records([(10, 1.0)])  # "split": "test", no kind
  assert report.eval_split_of(older) == "test" and report.series(older, "eval", "loss")[0] == [10]


def test_rows_sorted_by_metric_and_written_as_csv_and_markdown(tmp_path):
  rows = [{"workdir": "a", "final_test_accuracy": 0.8, "final_test_loss": 0.5},
          {"workdir": "b", "final_test_accuracy": None, "final_test_loss": None},
          {"workdir": "c", "final_test_accuracy": 0.9, "final_test_loss": 0.7}]
  assert [r["workdir"] for r in report.sort_rows(rows, "final_test_accuracy")] == ["c", "a", "b"]
  assert [r["workdir"] for r in report.sort_rows(rows, "final_test_loss")] == ["a", "c", "b"]
  with pytest.raises(report.UserError, match="final_test_accuracy"):
    report.sort_rows(rows, "accuracy")
  report.write_table(rows, str(tmp_path / "t.csv"), str(tmp_path / "t.md"), "Title")
  assert list(csv.DictReader(open(tmp_path / "t.csv")))[2]["final_test_accuracy"] == "0.9"
  markdown = (tmp_path / "t.md").read_text().splitlines()
  assert markdown[0] == "# Title"
  assert markdown[2] == "| workdir | final_test_accuracy | final_test_loss |"
  assert markdown[4] == "| a | 0.8000 | 0.5000 |"


def test_learning_curves_png_of_several_runs(tmp_path):
  path = str(tmp_path / "curves.png")
  runs = {"a": report.with_wall_time(_records([(10, 1.0), (20, 2.0)])),
          "b": report.with_wall_time(_records([(10, 1.5), (20, 3.0)]))}
  report.plot_learning_curves(runs, path)
  with Image.open(path) as image:
    assert image.size == (1200, 800)


def _run_report(*args):
  return subprocess.run([sys.executable, "-m", "research.report", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _check_png(path, size):
  assert os.path.getsize(path) > 10_000
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.size == size
    assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not a blank canvas


@pytest.mark.slow
def test_report_of_a_real_run(trained_workdir):
  result = _run_report(trained_workdir, "--step=best")
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(trained_workdir, "report")
  _check_png(os.path.join(out, "learning_curves.png"), (1200, 800))
  _check_png(os.path.join(out, "confusion_matrix.png"), (900, 800))
  _check_png(os.path.join(out, "per_class_accuracy.png"), (800, 500))
  summary = open(os.path.join(out, "report.md")).read()
  assert "| final test[:1000] accuracy |" in summary  # the smoke preset's eval split
  assert "## Checkpoint step 300 on the test[:1000] split" in summary
  run = json.load(open(os.path.join(trained_workdir, "run.json")))
  final = run["final_metrics"]["test[:1000]"]
  # The report's own evaluation of the checkpoint agrees with the training's.
  assert f"Accuracy {final['accuracy']:.4f} on 1000 examples." in summary
  assert "| Ankle boot |" in summary and "| class | accuracy | examples |" in summary


@pytest.mark.slow
def test_comparison_of_two_workdirs(trained_workdir, tmp_path):
  other = tmp_path / "runs" / "lr3e-4"
  shutil.copytree(trained_workdir, other, ignore=shutil.ignore_patterns("checkpoints", "report"))
  config = json.load(open(other / "config.json"))
  config["optimizer"]["learning_rate"] = 3e-4
  json.dump(config, open(other / "config.json", "w"))
  os.remove(other / "run.json")  # an older run without run.json still compares
  first = tmp_path / "runs" / "default"
  shutil.copytree(trained_workdir, first, ignore=shutil.ignore_patterns("report"))
  out = tmp_path / "out"
  result = _run_report(str(first), str(other), f"--out={out}", "--noconfusion")
  assert result.returncode == 0, result.stderr[-3000:]
  _check_png(out / "comparison_curves.png", (1200, 800))
  _check_png(out / "default" / "learning_curves.png", (1200, 800))
  table = (out / "comparison.md").read_text()
  assert "optimizer.learning_rate" in table and "0.0003" in table  # only what differs
  assert "batch_size" not in table
  rows = list(csv.DictReader(open(out / "comparison.csv")))
  assert {row["workdir"] for row in rows} == {str(first), str(other)}
