"""launch.sweep: axes, member workdirs, interruption and resume, results table, slurm."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import sweep
from research.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_axes_and_members():
  axes = sweep.parse_axes("optimizer.name=adam,sgd;optimizer.learning_rate=1e-3,3e-4")
  assert axes == [("optimizer.name", ["adam", "sgd"]),
                  ("optimizer.learning_rate", ["1e-3", "3e-4"])]
  members = sweep.members(axes)
  assert [m.name for m in members] == [
      "optimizer.name=adam,optimizer.learning_rate=1e-3",
      "optimizer.name=adam,optimizer.learning_rate=3e-4",
      "optimizer.name=sgd,optimizer.learning_rate=1e-3",
      "optimizer.name=sgd,optimizer.learning_rate=3e-4"]
  assert members[1].flags() == ["--config.optimizer.name=adam",
                                "--config.optimizer.learning_rate=3e-4"]
  # A sweep file: one axis per line, comments and --config. prefixes allowed.
  assert sweep.parse_axes("# lr\n--config.seed = 0, 1\n\nbatch_size=64 # big\n") == [
      ("seed", ["0", "1"]), ("batch_size", ["64"])]
  assert sweep.members([("model.conv_features", ["(8, 16)"])])[0].name == \
      "model.conv_features=_8__16_"


@pytest.mark.parametrize("text", ["", "optimizer.name", "=1,2", "seed=1,,2", "seed=1;seed=2",
                                  "bad key=1"])
def test_bad_axes_say_what_is_accepted(text):
  with pytest.raises(UserError, match="KEY=VALUE1|twice|no axis"):
    sweep.parse_axes(text)


def _sweep(root, *flags, env=None, **popen):
  command = [sys.executable, "-m", "launch.sweep", "--config=configs/default.py:smoke",
             f"--workdir={root}", *flags]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, **(env or {})}, **popen)


def test_slurm_launcher_refuses_without_sbatch(tmp_path):
  process = _sweep(tmp_path / "sweep", "--sweep=seed=0,1", "--launcher=slurm",
                   env={"PATH": str(tmp_path)})
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 2
  assert "needs SLURM's `sbatch`, which is not on PATH" in output
  assert not (tmp_path / "sweep").exists()


@pytest.mark.skipif(not os.path.exists(sweep.SLURM_SCRIPT), reason="needs launch/slurm.sbatch")
def test_slurm_launcher_submits_each_member_through_the_batch_script(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "sbatch.log"
  fake = bin_dir / "sbatch"  # records its arguments the way sbatch would receive them
  fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho Submitted batch job 4242\n")
  fake.chmod(0o755)
  process = _sweep(tmp_path / "sweep", "--sweep=seed=0,1", "--launcher=slurm",
                   "--sbatch_args=--nodes=2", "--", "--config.num_train_steps=60",
                   env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  calls = log.read_text().splitlines()
  assert len(calls) == 2
  args = calls[1].split()
  assert "--nodes=2" in args and args.index("--nodes=2") < args.index(sweep.SLURM_SCRIPT)
  assert args[args.index(sweep.SLURM_SCRIPT) + 1:] == [
      "--config=configs/default.py:smoke", f"--workdir={tmp_path / 'sweep' / 'seed=1'}",
      "--config.seed=1", "--config.num_train_steps=60"]
  state = json.load(open(tmp_path / "sweep" / "sweep.json"))
  assert state["jobs"] == {"seed=0": "4242", "seed=1": "4242"}
  assert (tmp_path / "sweep" / "results.md").exists()


def _wait_for_a_line(path, process, timeout=180):
  """Until `path` holds a complete line. (metrics.jsonl is created before the training loop
  installs its preemption handler; its first line is written inside the loop.)"""
  deadline = time.monotonic() + timeout
  while not (os.path.exists(path) and "\n" in open(path).read()):
    assert process.poll() is None, process.stdout.read()
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.2)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_members(tmp_path):
  root = tmp_path / "sweep"
  flags = ["--sweep=optimizer.learning_rate=1e-3,5e-4", "--",
           "--config.num_train_steps=400", "--config.log_every_steps=20",
           "--config.eval_every_steps=200"]
  first_member = root / "optimizer.learning_rate=1e-3"
  second_member = root / "optimizer.learning_rate=5e-4"

  process = _sweep(root, *flags)
  # Stop the sweep with a real SIGTERM once the second member has logged a step.
  _wait_for_a_line(second_member / "metrics.jsonl", process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=180)
  assert process.returncode == 128 + signal.SIGTERM, output
  assert "Sweep stopped by SIGTERM during optimizer.learning_rate=5e-4" in output
  finished = json.load(open(first_member / "run.json"))
  assert finished["status"] == "finished"
  stopped = json.load(open(second_member / "run.json"))
  assert stopped["status"] == "preempted" and stopped["sessions"][0]["end_step"] < 400
  first_metrics = (first_member / "metrics.jsonl").read_text()

  process = _sweep(root, *flags)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  assert "[1/2] optimizer.learning_rate=1e-3: finished earlier, skipped" in output
  assert f"Resumed from checkpoint step {stopped['sessions'][0]['end_step']}" in output
  assert json.load(open(first_member / "run.json")) == finished  # not touched again
  assert (first_member / "metrics.jsonl").read_text() == first_metrics
  resumed = json.load(open(second_member / "run.json"))
  assert resumed["status"] == "finished"
  assert [s["status"] for s in resumed["sessions"]] == ["preempted", "finished"]

  rows = list(csv.DictReader(open(root / "results.csv")))
  assert [row["status"] for row in rows] == ["finished", "finished"]
  accuracies = [float(row["final_test_accuracy"]) for row in rows]
  assert accuracies == sorted(accuracies, reverse=True)
  assert {row["optimizer.learning_rate"] for row in rows} == {"1e-3", "5e-4"}
  table = (root / "results.md").read_text()
  assert table.count("| finished |") == 2
  assert os.path.getsize(root / "results_curves.png") > 10_000
