"""Checkpoints moved between device layouts: a checkpoint holds global arrays, and restore
reads them onto the current run's mesh. Each source is a finished 4-step run."""

import shutil

import pytest
from conftest import run_main
from test_distributed import _env, _multiprocess, _records

# Each move below resumes a copy of a finished source run (same config: it restores,
# logs the parameters' fingerprint and stops) and starts a fresh one-step run from
# it with init_from; both must show the source's final fingerprint.

SOURCE = ["--config=configs/default.py:smoke", "--config.num_train_steps=4",
          "--config.log_every_steps=2", "--config.eval_every_steps=4",
          "--config.dataset.eval_split=test[:1000]", "--config.eval_batch_size=250"]
FINE_TUNE = ["--config=configs/default.py:smoke", "--config.num_train_steps=1",
             "--config.log_every_steps=1", "--config.dataset.eval_split=test[:200]",
             "--config.eval_batch_size=100"]


def _source(tmp_path_factory, devices: int) -> str:
  workdir = str(tmp_path_factory.mktemp(f"{devices}_devices") / "run")
  result = run_main(workdir, *SOURCE, env=_env(devices))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{devices} device(s)" in result.stderr
  return workdir


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  return _source(tmp_path_factory, 4)


def _run_on(devices: int, processes: int = 1):
  """Runs research.main on `devices` CPU devices per process, in `processes` processes."""
  if processes == 1:
    return lambda workdir, *flags: run_main(workdir, *flags, env=_env(devices))
  return lambda workdir, *flags: _multiprocess(processes, workdir, *flags,
                                               devices_per_process=devices)


def _check_move(source, source_flags, tmp_path, run, devices: int, *fine_tune_flags):
  """The source's final parameters arrive unchanged on the target layout, by resume
  and by init_from."""
  fingerprint = _records(source, "eval")[-1]["params_fingerprint"]
  step = _records(source, "eval")[-1]["step"]
  resumed = str(tmp_path / "resumed")
  shutil.copytree(source, resumed)
  result = run(resumed, *source_flags)
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Resumed from checkpoint step {step} in" in result.stderr
  assert f"(params {fingerprint})" in result.stderr
  assert f"already finished at step {step}" in result.stderr
  assert f"{devices} device(s)" not in result.stderr  # nothing trained
  fine_tuned = str(tmp_path / "fine_tuned")
  result = run(fine_tuned, *FINE_TUNE, *fine_tune_flags, f"--config.init_from={source}")
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Initialized from {source} (params {fingerprint})" in result.stderr
  assert f"{devices} device(s)" in result.stderr
  assert _records(fine_tuned, "eval")[-1]["num_examples"] == 200


@pytest.mark.slow
def test_four_device_checkpoint_restores_and_initializes_on_one_device(four_devices, tmp_path):
  _check_move(four_devices, SOURCE, tmp_path, _run_on(1), 1)


@pytest.mark.slow
def test_one_device_checkpoint_restores_and_initializes_on_eight_devices(tmp_path_factory,
                                                                         tmp_path):
  _check_move(_source(tmp_path_factory, 1), SOURCE, tmp_path, _run_on(8), 8)


@pytest.mark.slow
def test_eight_device_checkpoint_restores_and_initializes_on_two_processes(tmp_path_factory,
                                                                          tmp_path):
  """2 processes x 2 devices; init_from into parameters split over both processes."""
  _check_move(_source(tmp_path_factory, 8), SOURCE, tmp_path, _run_on(2, processes=2), 4,
              "--config.shard_params=True")
