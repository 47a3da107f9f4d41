"""Studies interrupted, with real trainers: a worker killed mid-trial (PostgreSQL), a study
stopped by SIGTERM, and a prune and a stop that come at the last evaluation. Each trial's
state is what happened to it, and an interrupted trial resumes from its checkpoint."""

import csv
import dataclasses
import glob
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from conftest import REPO, last_train_step
from research.studies import search_space, study
from research.studies.study_trial import Slot
# The study tests' command, plan and trainer flags, and their PostgreSQL server.
from test_study import LOG, _plan, _sweep, _sweep_command, postgres_url  # noqa: F401

# Trials that differ only in a knob no compiled program holds (a seed or a learning rate is
# compiled in), so every trial here runs the programs the first one compiled; long enough
# that a stop sent once a trainer has logged step 10 lands well inside it, with no periodic
# checkpoint: the trainer writes one when stopped, and the trial resumes there.
TWO_TRIALS = ["--sweep=keep_checkpoints=2,3", "--pruner=none"]
TRAINER = ["--config.num_train_steps=120", "--config.eval_every_steps=120", LOG]


def _wait_for(condition, process, timeout=300):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, process.communicate()[0][-3000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.02)


def _training(workdir):
  """True once the trainer in `workdir` has logged a training step: it is mid-trial."""
  return lambda: last_train_step(workdir) >= 10


@pytest.mark.slow
def test_a_verdict_at_the_last_evaluation_leaves_a_finished_trial_complete(tmp_path):
  """A pruner that decides at the last evaluation, and a stop request at that moment: the
  trainer has finished training, so neither stops it; the trial is complete, not failed."""
  import optuna

  stop = threading.Event()

  class LastEvaluationPruner(optuna.pruners.BasePruner):
    def prune(self, study_, trial):
      if trial.last_step == 3:
        stop.set()  # the worker is told to stop too, after training ended
        return True
      return False

  plan = dataclasses.replace(
      _plan(tmp_path, search="grid", trials=1),
      params=tuple(search_space.parse("seed=0")), search="grid",
      fixed=(*study.split_flags("train[:90%]", "train[90%:]"), "--config.num_train_steps=60",
             "--config.eval_every_steps=20", LOG), poll_seconds=0.2)
  opened = study.Study(plan)
  opened.optuna.pruner = LastEvaluationPruner()
  slot = Slot(0, {}, (), "all cores")
  assert opened.run_trial(opened.claim(), slot, stop, dict(os.environ)) == "complete"
  trial, = study.Study(plan).optuna.trials
  assert trial.state.name == "COMPLETE" and "failure" not in trial.user_attrs
  assert sorted(trial.intermediate_values) == [1, 2, 3]
  assert trial.value == trial.intermediate_values[3]
  info = json.load(open(tmp_path / "trials" / "trial-0000" / "run.json"))
  assert info["status"] == "finished" and info["sessions"][-1]["end_step"] == 60


@pytest.mark.slow
def test_two_workers_on_postgres_one_killed_mid_trial(tmp_path, postgres_url):  # noqa: F811
  """Two workers share a study on PostgreSQL. One is killed (SIGKILL) mid-trial: its trainer
  checkpoints and exits (it dies with its worker), the other worker notices the silent
  heartbeat, and the trial resumes from its checkpoint; every trial runs once."""
  root = tmp_path / "shared"
  # Trial 0 is taken for dead after three missed beats (6 s): time for the joining worker to
  # claim trial 1 first, and for the killed trainer, which holds trial 0's workdir until it
  # has checkpointed, to exit before the retry starts there.
  flags = [f"--storage={postgres_url}", *TWO_TRIALS, "--heartbeat=2", "--", *TRAINER]
  first = subprocess.Popen(_sweep_command(root, *flags), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  # The second worker joins once the first one's trainer trains (its programs compiled, so
  # the second's trainers find them compiled), and the first is killed then, mid-trial.
  _wait_for(_training(root / "trials" / "trial-0000"), first)
  second = subprocess.Popen(_sweep_command(root, *flags), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  first.kill()  # SIGKILL: no chance to tell the study anything
  first.wait()
  output, _ = second.communicate(timeout=900)
  assert second.returncode == 0, output[-4000:]

  import optuna

  loaded = optuna.load_study(study_name="shared", storage=postgres_url)
  states = sorted((t.user_attrs["slot"], t.state.name) for t in loaded.trials)
  complete = [slot for slot, state in states if state == "COMPLETE"]
  assert sorted(complete) == [0, 1], states  # every trial's result arrived, once
  failed = [t for t in loaded.trials if t.state.name == "FAIL"]
  assert len(failed) == 1, states  # the killed worker's trial, failed by its silent heartbeat
  sessions = {}
  for workdir in sorted(glob.glob(str(root / "trials" / "trial-*"))):
    info = json.load(open(os.path.join(workdir, "run.json")))
    assert info["status"] == "finished"
    sessions[os.path.basename(workdir)] = info["sessions"]
  resumed = [name for name, s in sessions.items() if len(s) > 1]
  assert resumed == ["trial-0000"], sessions  # the killed worker's trial
  for name in resumed:  # resumed from its checkpoint, not started over
    assert sessions[name][1]["start_step"] > 0, sessions[name]
    assert sessions[name][1]["start_step"] == sessions[name][0]["end_step"]
  for name, s in sessions.items():
    if name not in resumed:
      assert len(s) == 1 and s[0]["start_step"] == 0
  rows = list(csv.DictReader(open(root / "results.csv")))
  assert len(rows) == 2 and {row["state"] for row in rows} == {"complete"}
  assert sum(int(row["retries"]) for row in rows) == len(failed)
  assert "Chosen: trial" in (root / "results.md").read_text()


@pytest.mark.slow
def test_a_stopped_study_resumes_its_interrupted_trial_from_the_checkpoint(tmp_path):
  root = tmp_path / "stopped"
  # Chosen on the split it reports, as a user may: no separate test evaluation here (the
  # embedded study of test_study.py has one), and the table says the number is not an
  # unbiased estimate.
  flags = [*TWO_TRIALS, "--test_split=train[90%:]", "--", *TRAINER]
  first = subprocess.Popen(_sweep_command(root, *flags), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  _wait_for(_training(root / "trials" / "trial-0000"), first)
  first.send_signal(signal.SIGTERM)
  output, _ = first.communicate(timeout=300)
  assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
  assert "interrupted" in output and "run the same command to resume" in output
  second = _sweep(root, *flags)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  info = json.load(open(root / "trials" / "trial-0000" / "run.json"))
  sessions = [(s["status"], s["start_step"], s["end_step"]) for s in info["sessions"]]
  assert sessions[0][0] == "preempted" and 0 < sessions[0][2] < 120
  assert sessions[1] == ("finished", sessions[0][2], 120)
  rows = list(csv.DictReader(open(root / "results.csv")))
  assert sorted((row["workdir"], row["state"], row["retries"]) for row in rows) == [
      ("trials/trial-0000", "complete", "1"), ("trials/trial-0001", "complete", "0")]
  assert ("Selected on train[90%:] itself: the best number is not an unbiased estimate"
          in (root / "results.md").read_text())
  assert not glob.glob(str(root / "trials" / "*" / "eval.jsonl"))
