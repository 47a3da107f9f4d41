"""Checkpoints moved between device layouts: a checkpoint holds global arrays, and restore
reads them onto the current run's mesh. The moves form a chain, each target run the next
move's source: a finished 4-step run on 4 devices moves to 1 device, the one-step run
made there moves to 8 devices, and the one made there to 2 processes.

Every run here is compiled without XLA's costlier passes (conftest.FAST_COMPILE): a
move is checked by the parameters' fingerprint, a hash of their bytes as restored,
which no compiled program computes; nothing here is compared with a run compiled
otherwise, and these runs' time goes to compiling (a few steps each)."""

import shutil
import subprocess
from typing import NamedTuple

import pytest
from conftest import run_main, with_fast_compile
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


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """The first source: a finished 4-step run on 4 devices."""
  workdir = str(tmp_path_factory.mktemp("4_devices") / "run")
  result = run_main(workdir, *SOURCE, env=with_fast_compile(_env(4)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4 device(s)" in result.stderr
  return workdir


def _run_on(devices: int, processes: int = 1):
  """Runs research.main on `devices` CPU devices per process, in `processes` processes."""
  if processes == 1:
    return lambda workdir, *flags: run_main(workdir, *flags,
                                            env=with_fast_compile(_env(devices)))
  return lambda workdir, *flags: _multiprocess(processes, workdir, *flags,
                                               devices_per_process=devices, fast_compile=True)


class Move(NamedTuple):
  """A source run moved to a target layout: a resumed copy of it and a one-step run
  made from it with init_from (`fine_tuned`, run with `fine_tune_flags`)."""
  source: str
  resumed: subprocess.CompletedProcess
  fine_tuned: str
  fine_tune: subprocess.CompletedProcess
  fine_tune_flags: list


def _move(source, source_flags, folder, run, *fine_tune_flags) -> Move:
  """Resumes a copy of `source` with its own command, then makes a one-step run from it,
  both in `folder` on the target layout (`run`)."""
  resumed = str(folder / "resumed")
  shutil.copytree(source, resumed)
  resumed_result = run(resumed, *source_flags)
  fine_tuned = str(folder / "fine_tuned")
  flags = [*FINE_TUNE, *fine_tune_flags, f"--config.init_from={source}"]
  return Move(source, resumed_result, fine_tuned, run(fine_tuned, *flags), flags)


def _check_move(move: Move, devices: int) -> None:
  """The source's final parameters arrive unchanged on the target layout (`devices`
  devices in all), by resume and by init_from."""
  source = move.source
  fingerprint = _records(source, "eval")[-1]["params_fingerprint"]
  step = _records(source, "eval")[-1]["step"]
  result = move.resumed
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Resumed from checkpoint step {step} in" in result.stderr
  assert f"(params {fingerprint})" in result.stderr
  assert f"already finished at step {step}" in result.stderr
  assert f"{devices} device(s)" not in result.stderr  # nothing trained
  result = move.fine_tune
  assert result.returncode == 0, result.stderr[-5000:]
  assert f"Initialized from {source} (params {fingerprint})" in result.stderr
  assert f"{devices} device(s)" in result.stderr
  assert _records(move.fine_tuned, "eval")[-1]["num_examples"] == 200


@pytest.fixture(scope="module")
def to_one_device(four_devices, tmp_path_factory):
  """The 4-device source moved to 1 device."""
  return _move(four_devices, SOURCE, tmp_path_factory.mktemp("to_1_device"), _run_on(1))


@pytest.fixture(scope="module")
def to_eight_devices(to_one_device, tmp_path_factory):
  """The one-step run made on 1 device above, a finished run, moved to 8 devices."""
  assert to_one_device.fine_tune.returncode == 0, "no 1-device source (see the test above)"
  return _move(to_one_device.fine_tuned, to_one_device.fine_tune_flags,
               tmp_path_factory.mktemp("to_8_devices"), _run_on(8))


@pytest.mark.slow
def test_four_device_checkpoint_restores_and_initializes_on_one_device(to_one_device):
  _check_move(to_one_device, 1)


@pytest.mark.slow
def test_one_device_checkpoint_restores_and_initializes_on_eight_devices(to_eight_devices):
  _check_move(to_eight_devices, 8)


@pytest.mark.slow
def test_eight_device_checkpoint_restores_and_initializes_on_two_processes(to_eight_devices,
                                                                          tmp_path):
  """2 processes x 2 devices; init_from into parameters split over both processes."""
  assert to_eight_devices.fine_tune.returncode == 0, "no 8-device source (see the test above)"
  _check_move(_move(to_eight_devices.fine_tuned, to_eight_devices.fine_tune_flags, tmp_path,
                    _run_on(2, processes=2), "--config.shard_params=True"), 4)
