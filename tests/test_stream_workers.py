"""Streamed input decoded in worker processes (config.dataset.workers, research/data/stream_input.py).

The worker count changes nothing computed: the same batches with threads (0) and with
1 or 2 processes (two deal the batches out between them, in an uneven share: 7 batches),
Inception crops included; a worker killed mid-run is reported as
a clear error within seconds, never a hang, even one killed while it held a lock grain
waits on; and a streamed run with workers, killed
with SIGKILL, resumes to bitwise-equal parameters.
"""

import multiprocessing.synchronize
import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import interrupt_at_step, records, run_here, run_main
from research import mesh as mesh_lib
from research.data import datasets, data_source, stream_input
from research.errors import TrainingFailure
from test_datasets import _dataset_config, jpeg_dir  # noqa: F401 (a fixture)
from test_streaming import RUN, _final_params


def _source(jpeg_dir, **fields):
  return data_source.from_config(_dataset_config(
      "tiny_jpeg_images", jpeg_dir, eval_split="validation", image_size=16, input="stream",
      **fields))


def _batches(source, workers, steps=7, start=0):
  stream = stream_input.TrainStream(source.train, mesh_lib.make_mesh(), seed=5, batch_size=8,
                                    total_steps=steps, start_step=start, log_every=steps - start,
                                    crop="inception", workers=workers)
  try:
    (images, labels, _), = stream.batches(start, steps)
    return np.asarray(images), np.asarray(labels)
  finally:
    stream.close()


@pytest.mark.slow
def test_the_worker_count_changes_no_batch(jpeg_dir):
  source = _source(jpeg_dir)
  images, labels = _batches(source, workers=0)  # threads in this process
  np.testing.assert_array_equal(labels, source.train.read(
      datasets.batch_indices(5, 0, 7, 8, 24).ravel(), "centre")[1].reshape(7, 8))
  for workers in (1, 2):
    other_images, other_labels = _batches(source, workers)
    np.testing.assert_array_equal(other_images, images, err_msg=f"{workers} workers")
    np.testing.assert_array_equal(other_labels, labels)
  # A stream started at step 4 (a resumed run) hands out the batches of steps 4 to 6.
  np.testing.assert_array_equal(_batches(source, 0, start=4)[0], images[4:])
  # Crops differ between examples and epochs: the same image is not cropped twice alike.
  assert len({image.tobytes() for image in images.reshape(-1, 16, 16, 3)}) == 56


def _worker_pids() -> list[int]:
  """This process's children started by multiprocessing's spawn (grain's workers)."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        spawned = b"spawn_main" in f.read()
    except (OSError, ValueError, IndexError):
      continue
    if parent == os.getpid() and spawned:
      found.append(int(entry))
  return found


@pytest.mark.slow
@pytest.mark.parametrize("holding_a_lock", [False, True], ids=["killed", "killed_holding_a_lock"])
def test_a_killed_worker_is_a_clear_error_not_a_hang(jpeg_dir, monkeypatch, holding_a_lock):
  """A SIGKILLed worker ends the consumer's wait with a TrainingFailure within seconds,
  and close() returns. `holding_a_lock`: the worker died holding the lock of grain's stop
  Event (seen once in ~10 runs: SIGKILL never releases a process's locks), simulated
  by an Event.set that blocks in this process until the test ends; grain's own report
  of the death and its close() wait on it, the stream's watch of exit codes does not."""
  released = threading.Event()
  if holding_a_lock:
    original_set = multiprocessing.synchronize.Event.set
    monkeypatch.setattr(multiprocessing.synchronize.Event, "set",
                        lambda event: released.wait() and original_set(event))
  source = _source(jpeg_dir)
  stream = stream_input.TrainStream(source.train, mesh_lib.make_mesh(), seed=0, batch_size=8,
                                    total_steps=3000, start_step=0, log_every=1, crop="inception",
                                    workers=2)
  failure = []

  def consume():
    try:
      for step in range(1, 3000):
        for _ in stream.batches(step, step + 1):
          pass
    except Exception as e:  # the error the training loop would see
      failure.append(e)

  try:
    next(stream.batches(0, 1))  # the workers are up
    os.kill(_worker_pids()[0], signal.SIGKILL)
    started = time.perf_counter()
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=60)
    assert not consumer.is_alive(), "the stream hung after its worker was killed"
    reported = time.perf_counter() - started
  finally:
    # Bounded, so that a hang fails this test instead of stopping the suite.
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(timeout=60)
    closed = not closer.is_alive()
    released.set()  # grain's threads, if waiting on the simulated lock, go on and end
  assert closed, "closing the stream hung after its worker was killed"
  assert failure and isinstance(failure[0], TrainingFailure), failure
  message = str(failure[0])
  assert "input worker process died" in message and "exit code -9" in message
  assert "rerun the same command to resume" in message
  assert reported < 20, reported


@pytest.mark.slow
def test_stream_run_with_workers_killed_resumes_bit_identical(tmp_path):
  """SIGKILL (no checkpoint on the way out) after step 25 of the 40-step stream run with
  2 decoding processes, then the same command with 1: the newest checkpoint (step 20)
  resumes to the parameters of the uninterrupted run, bit for bit. That run decodes
  with threads (workers=0), in this process: no worker processes or interpreter to start
  (each costs seconds of imports), and a third worker count that must change nothing."""
  reference = str(tmp_path / "reference")
  result = run_here(reference, *RUN, "--config.dataset.workers=0",
                    "--config.num_train_steps=40")
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = str(tmp_path / "run")
  returncode, stderr = interrupt_at_step(workdir, [*RUN, "--config.dataset.workers=2",
                                                   "--config.num_train_steps=40"],
                                         signal.SIGKILL, 25, after_checkpoint=20)
  assert returncode == -signal.SIGKILL, stderr[-3000:]
  resumed = run_main(workdir, *RUN, "--config.dataset.workers=1", "--config.num_train_steps=40")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from checkpoint step 20" in resumed.stderr
  # Every shared-memory batch is freed by the run, none left to Python's resource tracker.
  assert "leaked shared_memory" not in resumed.stderr, resumed.stderr[-3000:]
  assert records(workdir)[-1] == records(reference)[-1]
  for a, b in zip(_final_params(workdir, 40).values(), _final_params(reference, 40).values()):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
