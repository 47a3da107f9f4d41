"""TensorBoard reads our runs: the real server over HTTP, and after a kill and a resume,
TensorBoard's own event reader finds exactly metrics.jsonl's points, one per step."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import REPO, interrupt_at_step, run_here
from research.run import run_log


def _metrics_points(workdir) -> dict:
  """{tag: [(step, value)]} as TensorBoard should show metrics.jsonl: each record's scalars
  under the tags the writer gives them (run_log._scalars, whose naming is tested below)."""
  points = {}
  for record in run_log.read_records(os.path.join(workdir, "metrics.jsonl")):
    for tag, value in run_log._scalars(record).items():
      points.setdefault(tag, []).append((record["step"], value))
  return points


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(port, path):
  with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
    return json.loads(response.read())


@pytest.mark.slow
def test_the_real_tensorboard_serves_a_finished_runs_scalars(trained_workdir, tmp_path):
  port = _free_port()
  tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  server = subprocess.Popen(
      [tensorboard, f"--logdir={os.path.join(trained_workdir, 'tensorboard')}",
       "--host=127.0.0.1", f"--port={port}"],
      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "tensorboard.log", "w"))
  try:
    expected = _metrics_points(trained_workdir)
    deadline, tags = time.time() + 120, {}
    while time.time() < deadline:  # the server starts, then loads the files in the background
      assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()[-3000:]
      try:
        tags = _get(port, "/data/plugin/scalars/tags")
      except OSError:
        tags = {}
      if tags and set(expected) <= set(next(iter(tags.values()))):
        break
      time.sleep(0.5)
    assert len(tags) == 1, tags  # one run: the workdir's tensorboard folder
    run, run_tags = next(iter(tags.items()))
    assert set(run_tags) == set(expected)
    for tag, points in expected.items():
      query = urllib.parse.urlencode({"run": run, "tag": tag})
      served = _get(port, f"/data/plugin/scalars/scalars?{query}")  # [wall_time, step, value]
      assert [step for _, step, _ in served] == [step for step, _ in points]
      np.testing.assert_allclose([value for _, _, value in served],
                                 [value for _, value in points], rtol=1e-6)
  finally:
    # Killed, not stopped by SIGINT: on a loaded machine its shutdown waited out a 20 s
    # timeout while its reloader thread read the files; how it stops is not tested here.
    server.kill()
    server.wait()


def _tensorboard_points(workdir) -> dict:
  """{tag: [(step, value)]} as TensorBoard's own event reader finds them."""
  from tensorboard.backend.event_processing import event_accumulator

  reader = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                              size_guidance={event_accumulator.SCALARS: 0})
  reader.Reload()
  return {tag: [(event.step, event.value) for event in reader.Scalars(tag)]
          for tag in reader.Tags()["scalars"]}


RUN = ["--config=configs/default.py:smoke", "--config.num_train_steps=100",
       "--config.log_every_steps=10", "--config.eval_every_steps=50"]


@pytest.mark.slow
def test_after_a_kill_and_a_resume_every_tag_has_one_point_per_step(tmp_path):
  workdir = str(tmp_path / "run")
  code, stderr = interrupt_at_step(workdir, RUN, signal.SIGKILL, at_step=90, after_checkpoint=50)
  assert code == -signal.SIGKILL, stderr[-3000:]  # killed past the checkpoint at step 50
  killed = _tensorboard_points(workdir)
  assert max(step for step, _ in killed["train/loss"]) > 50  # points the resume takes back

  resumed = run_here(workdir, *RUN)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from checkpoint step 50" in resumed.stderr
  shown, expected = _tensorboard_points(workdir), _metrics_points(workdir)
  assert set(shown) == set(expected)
  for tag, points in expected.items():
    assert [step for step, _ in shown[tag]] == [step for step, _ in points], tag
    assert len({step for step, _ in points}) == len(points)  # one point per step
    np.testing.assert_allclose([v for _, v in shown[tag]], [v for _, v in points], rtol=1e-6)


def test_event_files_are_rewritten_to_metrics_points_whatever_a_kill_left(tmp_path):
  """Points past the resume step go, points never flushed come back, a record cut
  short ends its file, and the first file keeps its name (it sorts before new ones)."""
  from tensorboardX import SummaryWriter

  directory = tmp_path / "tensorboard"
  first = SummaryWriter(str(directory), filename_suffix=".a")
  for step in (10, 20, 30):  # the killed run: 30 is past the checkpoint at 20
    first.add_scalar("train/loss", 1.0 / step, step)
  first.close()
  second = SummaryWriter(str(directory), filename_suffix=".b")
  second.add_scalar("train/loss", 0.05, 20)  # the same step again (a resume before the fix)
  second.close()
  [_, path_b] = sorted(str(p) for p in directory.iterdir())
  with open(path_b, "ab") as f:
    f.write(b"\x20\x00\x00\x00")  # a record cut short by SIGKILL
  points = {("train/loss", 10): 0.1, ("train/loss", 20): 0.05, ("test/accuracy", 20): 0.5}

  run_log.match_tensorboard_to(str(directory), points)
  files = sorted(p.name for p in directory.iterdir())
  assert len(files) == 1 and files[0].endswith(".a")
  shown = _tensorboard_points(str(tmp_path))
  assert shown == {"train/loss": [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))],
                   "test/accuracy": [(20, 0.5)]}
  before = (directory / files[0]).read_bytes()
  run_log.match_tensorboard_to(str(directory), points)  # already right: untouched
  assert (directory / files[0]).read_bytes() == before


def test_evaluations_are_tagged_by_the_split_they_name_and_old_records_read_as_before():
  new = {"step": 5, "split": "train[90%:]", "kind": "eval", "accuracy": 0.5, "elapsed": 1.0}
  old = {"step": 5, "split": "test", "accuracy": 0.5, "elapsed": 1.0}  # before splits were named
  train = {"step": 5, "split": "train", "loss": 0.3, "elapsed": 1.0}
  on_train = {"step": 5, "split": "train", "kind": "eval", "accuracy": 0.5, "elapsed": 1.0}
  assert [run_log.is_evaluation(r) for r in (new, old, train, on_train)] == [True] * 2 + [
      False, True]
  assert run_log._scalars(new) == {"train.90pct_to_end/accuracy": 0.5}
  assert run_log._scalars(old) == {"test/accuracy": 0.5}
  assert run_log._scalars(on_train) == {"train_eval/accuracy": 0.5}  # apart from training's
  assert run_log.split_tag("train[:10%]+test") == "train.start_to_10pct_test"
