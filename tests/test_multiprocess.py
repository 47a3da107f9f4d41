"""Several processes joined by `jax.distributed` on 127.0.0.1 (launch/multiprocess.sh, and
slurm.sbatch under a stand-in SLURM): they train like one device, split the parameters
over both processes through a preemption, and refuse a bad batch in every process.
Tolerances: test_distributed.py's docstring."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, with_fast_compile
from test_distributed import (COMMON, _assert_same_training, _env, _multiprocess, _records,
                              one_device_reference)
from test_launchers import _fake_slurm

# 20 steps, every one logged, and one evaluation (COMMON evaluates every 20): a wrong,
# missing or duplicated shard changes the loss from step 1 on. Every step of two
# processes waits on the other (gradients, metrics, the preemption vote) through gloo:
# on a loaded 2-core machine each step costs far more than in one process.
STEPS = 20
# The runs here pass fast_compile (conftest.FAST_COMPILE): both processes of a run compile
# the same programs at once, and their losses are compared within RTOL, not bit for bit
# (the file alone: 86 CPU-s against 97).


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  return one_device_reference(tmp_path_factory, steps=STEPS)


@pytest.mark.slow
def test_two_processes_of_two_devices_train_like_one(one_device, tmp_path):
  workdir = str(tmp_path / "run")
  result = _multiprocess(2, workdir, *COMMON, f"--config.num_train_steps={STEPS}",
                         "--config.checkpoint_every_steps=10", fast_compile=True)
  assert result.returncode == 0, result.stderr[-5000:]
  assert "JAX process 1 of 2" in result.stderr and "4 device(s)" in result.stderr
  _assert_same_training(workdir, one_device, range(1, STEPS + 1))
  # Only process 0 writes logs: one TensorBoard event file, one config.
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  assert json.load(open(os.path.join(workdir, "config.json")))["num_train_steps"] == STEPS
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def _pid_of(workdir, process_id: int) -> int:
  """The pid of `research.main --workdir=WORKDIR --process_id=I` (from /proc)."""
  wanted = {"research.main", f"--workdir={workdir}", f"--process_id={process_id}"}
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        arguments = set(f.read().decode(errors="replace").split("\0"))
    except OSError:
      continue
    if entry.isdigit() and wanted <= arguments:
      return int(entry)
  raise AssertionError(f"no process {process_id} of a run in {workdir}")


@pytest.mark.slow
def test_sharded_params_over_two_processes_train_like_replicated_through_a_preemption(
    one_device, tmp_path):
  """FSDP-style: params and Adam moments split over 4 devices in 2 processes. A
  SIGTERM to process 1 alone stops both at the same step with a checkpoint
  written by both; the rerun restores the split state and trains on to step 20
  with the same losses as one device."""
  workdir = str(tmp_path / "run")
  flags = [*COMMON, "--config.shard_params=True"]
  with open(tmp_path / "first.log", "w") as log:
    first = subprocess.Popen(
        [os.path.join(REPO, "launch", "multiprocess.sh"), "2", f"--workdir={workdir}", *flags,
         "--config.num_train_steps=1000"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env=with_fast_compile({**os.environ, **_env(2), "PYTHON": sys.executable}))
    deadline = time.monotonic() + 180
    while not (os.path.exists(os.path.join(workdir, "metrics.jsonl"))
               and len(_records(workdir, "train")) >= 3):
      assert first.poll() is None and time.monotonic() < deadline, "training never got going"
      time.sleep(0.05)
    os.kill(_pid_of(workdir, 1), signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM
  output = (tmp_path / "first.log").read_text()
  assert "Preempted (SIGTERM)" in output, output[-3000:]
  stopped_at = max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")))
  assert 3 <= stopped_at < STEPS

  result = _multiprocess(2, workdir, *flags, f"--config.num_train_steps={STEPS}",
                         "--allow_config_change", fast_compile=True)
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Resumed from checkpoint step {stopped_at}" in result.stderr
  _assert_same_training(workdir, one_device, range(1, STEPS + 1))
  assert sorted(map(int, os.listdir(os.path.join(workdir, "checkpoints")))) == [stopped_at, STEPS]


@pytest.mark.slow
def test_slurm_job_joins_processes_and_every_process_refuses_a_bad_batch(tmp_path):
  """slurm.sbatch in a (one-machine) SLURM job: the two tasks find each other by
  JAX's SLURM detection alone (4 devices in all) and both refuse batch 30."""
  result = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *COMMON, "--config.batch_size=30",
       f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
      timeout=120, env={**os.environ, **_fake_slurm(tmp_path)})
  assert result.returncode == 2, result.stderr[-3000:]
  assert "2 processes of research.main" in result.stderr
  assert result.stderr.count("multiple of 4, e.g. 28 or 32") == 2  # both processes say why
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()
