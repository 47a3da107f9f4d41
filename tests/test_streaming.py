"""The streaming input path (config.dataset.input="stream", research/data/stream_input.py).

Real data only: the prepared Fashion-MNIST, and a TFDS dataset of JPEGs of varying
sizes generated here (test_datasets.TinyJpegImages). Stream and memory runs must
see the same batches and train to the same parameters; an interrupted stream run
resumes bit for bit; evaluation counts every example once; two processes train
like one. The ImageNet recipe streams JPEGs, as written, in test_device_counts_imagenet.py.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO, interrupt_at_step, records, run_here, run_main, with_fast_compile
from research import mesh as mesh_lib
from research.config import config_validation
from research.data import datasets, data_source, stream_input
from research.errors import UserError
from research.run import train
from test_datasets import _dataset_config, jpeg_dir  # noqa: F401,F811 (a fixture)

# One short run, shared by the tests that start processes: 80 steps, a log line
# (and a chunk of compiled steps) every 10, an evaluation and a checkpoint every 20
# on the first 1000 test examples in batches of 96 (the last one padded).
SETTINGS = {"dataset.input": "stream", "dataset.eval_split": "test[:1000]",
            "num_train_steps": 80, "log_every_steps": 10, "eval_every_steps": 20,
            "eval_batch_size": 96}
RUN = ["--config=configs/default.py",
       *(f"--config.{key}={value}" for key, value in SETTINGS.items())]


def _config(**overrides):
  from configs import default

  config = default.get_config()
  for key, value in {**SETTINGS, **overrides}.items():
    group, _, field = key.rpartition(".")
    (config[group] if group else config)[field] = value
  return config


def _final_params(workdir, step):
  import orbax.checkpoint as ocp

  directory = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(directory)["params"]


def _meta(workdir, step):
  with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def _train_stream(dataset_config, **settings):
  source = data_source.from_config(dataset_config)
  return stream_input.TrainStream(source.train, mesh_lib.make_mesh(),
                                  order_name=source._order_name,
                                  split_name=dataset_config.train_split, **settings)


def _eval_reader(dataset_config, split):
  return data_source.from_config(dataset_config, split, train=False).eval


def _fashion_mnist_config(**fields):
  return ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": "", "train_split": "train",
                                    "eval_split": "test", "image_size": 0, "input": "stream",
                                    **fields})


@pytest.fixture(scope="module")
def stream_reference(tmp_path_factory):
  """The uninterrupted stream run of RUN, in a process of its own."""
  workdir = str(tmp_path_factory.mktemp("stream_reference") / "run")
  result = run_main(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# ---- The batches -------------------------------------------------------------------


def test_stream_batches_are_the_memory_batches(fashion_mnist):
  """Steps 1873-1877 cross from epoch 0 into epoch 1; pieces of 4 steps, then 1."""
  _, train_split, _ = fashion_mnist
  stream = _train_stream(_fashion_mnist_config(), seed=3, batch_size=32, total_steps=2000,
                         start_step=1873, log_every=4)
  try:
    pieces = list(stream.batches(1873, 1878))
    assert [len(images) for images, _, _ in pieces] == [4, 1]
    images = np.concatenate([np.asarray(images) for images, _, _ in pieces])
    labels = np.concatenate([np.asarray(labels) for _, labels, _ in pieces])
    indices = datasets.batch_indices(3, 1873, 5, 32, len(train_split))
    np.testing.assert_array_equal(images, train_split.images[indices])
    np.testing.assert_array_equal(labels, train_split.labels[indices])
    assert stream.position == 1878
    assert stream.checkpoint_meta()["input"] == {
        "next_step": 1878, "dataset": "fashion_mnist/3.0.1", "split": "train",
        "num_examples": 60000, "batch_size": 32, "seed": 3}
    with pytest.raises(RuntimeError, match="at step 1878, training at step 1900"):
      next(stream.batches(1900, 1910))
  finally:
    stream.close()


def test_stream_eval_reads_every_example_exactly_once(fashion_mnist):
  _, _, test_split = fashion_mnist
  evaluation = stream_input.EvalStream(_eval_reader(_fashion_mnist_config(), "test[:1000]"),
                                       mesh_lib.make_mesh(), batch_size=96)
  images, labels, mask = (np.concatenate([np.asarray(piece[i]) for piece in evaluation()])
                          for i in range(3))
  assert images.shape == (11, 96, 28, 28, 1) and labels.shape == mask.shape == (11, 96)
  assert mask.sum() == 1000 and mask[:-1].all() and not mask[-1, 40:].any()
  real = mask.ravel() == 1
  np.testing.assert_array_equal(images.reshape(-1, 28, 28, 1)[real], test_split.images[:1000])
  np.testing.assert_array_equal(labels.ravel()[real], test_split.labels[:1000])
  assert not images.reshape(-1, 28, 28, 1)[~real].any()  # padding is zeros


@pytest.mark.slow
def test_report_reads_a_streamed_eval_split_in_chunks(stream_reference, fashion_mnist):
  from research.tools import report

  _, _, test_split = fashion_mnist
  chunks = list(report.eval_examples(_fashion_mnist_config(eval_split="test[:1000]"), chunk=300))
  assert [len(images) for images, _ in chunks] == [300, 300, 300, 100]  # never the whole split
  np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), test_split.images[:1000])
  np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), test_split.labels[:1000])
  # The report's confusion matrix of the stream run's checkpoint agrees with its own evaluation.
  evaluation = report.evaluate_checkpoint(stream_reference, "latest")
  final = json.load(open(os.path.join(stream_reference, "run.json")))["final_metrics"]["test[:1000]"]
  assert evaluation["counts"].sum() == 1000
  assert evaluation["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)


def test_the_number_of_reader_threads_changes_nothing_read(fashion_mnist):
  assert stream_input.reader_threads(3) == 3
  assert stream_input.reader_threads(0) == min(stream_input.MAX_THREADS,
                                               len(os.sched_getaffinity(0)))
  reader = _eval_reader(_fashion_mnist_config(), "test[:500]")
  mesh = mesh_lib.make_mesh()
  one, default = (
      [tuple(np.asarray(array) for array in piece)
       for piece in stream_input.EvalStream(reader, mesh, batch_size=64, threads=t)()]
      for t in (1, 0))
  for piece_one, piece_default in zip(one, default, strict=True):
    for a, b in zip(piece_one, piece_default):
      np.testing.assert_array_equal(a, b)


def test_pieces_per_call_divide_the_log_interval_and_bound_the_bytes():
  assert stream_input.steps_per_call(32 * 784, 125) == 125
  assert stream_input.steps_per_call(1024 * 224 * 224 * 3, 100) == 1  # one step: no host copy
  assert stream_input.steps_per_call(128 * 224 * 224 * 3, 100) == 5  # 6 fit; 5 divides 100
  assert stream_input.steps_per_call(stream_input.CALL_BYTES * 2, 100) == 1


# ---- Training ------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_path_trains_exactly_like_the_stream(stream_reference, tmp_path):
  """Same batches, same compiled train_step: the memory run's metrics and parameters
  equal the stream run's bit for bit (train losses, evaluations, fingerprints)."""
  workdir = str(tmp_path / "memory")
  checked = config_validation.validate(_config(**{"dataset.input": "memory"}))
  final = train.train_and_evaluate(checked, workdir)
  assert records(workdir) == records(stream_reference)
  assert final["num_examples"] == 1000
  tests = [r for r in records(stream_reference) if r["split"] == "test[:1000]"]
  assert [r["step"] for r in tests] == [20, 40, 60, 80]
  assert all(r["num_examples"] == 1000 for r in tests)
  assert _meta(stream_reference, 80)["input"]["next_step"] == 80
  assert "input" not in _meta(workdir, 80)  # the memory path's checkpoints are unchanged


@pytest.mark.slow
def test_stream_steps_in_short_pieces_train_like_whole_chunks(stream_reference, tmp_path,
                                                                monkeypatch):
  """A byte budget of 3 batches cuts every 10-step chunk into compiled calls of 2
  steps (the largest divisor of 10 that fits): the same parameters bit for bit."""
  monkeypatch.setattr(stream_input, "CALL_BYTES", 3 * 32 * 28 * 28)
  workdir = str(tmp_path / "pieces")
  final = train.train_and_evaluate(config_validation.validate(_config(num_train_steps=40)), workdir)
  expected = [r for r in records(stream_reference) if r["step"] <= 40]
  assert records(workdir) == expected
  assert final["params_fingerprint"] == expected[-1]["params_fingerprint"]


@pytest.mark.slow
def test_interrupted_stream_run_resumes_bit_identical(stream_reference, tmp_path):
  """Stopped by SIGTERM after a random step (a checkpoint holds the stream's
  position), then restarted with the same command."""
  at_step = random.Random(7).randrange(10, 40)
  workdir = str(tmp_path / "run")
  returncode, stderr = interrupt_at_step(workdir, RUN, signal.SIGTERM, at_step)
  assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
  stopped_at = max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")))
  assert at_step <= stopped_at < 80
  assert _meta(workdir, stopped_at)["input"]["next_step"] == stopped_at

  resumed = run_here(workdir, *RUN)  # the reference ran in a process of its own
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from checkpoint step {stopped_at}" in resumed.stderr
  assert records(workdir) == records(stream_reference)
  for a, b in zip(_final_params(workdir, 80).values(),
                  _final_params(stream_reference, 80).values()):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.slow
def test_checkpoint_whose_recorded_position_disagrees_is_refused(stream_reference):
  stream = _train_stream(_fashion_mnist_config(), seed=0, batch_size=32, total_steps=80,
                         start_step=80, log_every=10)
  meta = _meta(stream_reference, 80)
  stream.check_resumed(meta, 80)
  stream.check_resumed({"config": {}}, 80)  # a memory-mode checkpoint: nothing recorded
  with pytest.raises(UserError, match="recorded the input stream at step 80"):
    stream.check_resumed(meta, 100)
  stream.close()


@pytest.mark.slow
def test_eval_mode_streams_a_checkpoint(stream_reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(stream_reference, workdir)
  result = run_here(workdir, "--mode=eval", "--config.eval.split=test[1000:1500]")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval.jsonl")) as f:
    record = json.loads(f.readline())
  assert record["step"] == 80 and record["num_examples"] == 500


@pytest.mark.slow
def test_two_processes_stream_like_one(stream_reference, tmp_path):
  """2 processes x 2 CPU devices, each reading only its rows of every batch, train
  with the losses of one process on one device (rtol 1e-3: see test_distributed.py
  for why not bit for bit), and every evaluation counts the 1000 examples once."""
  workdir = str(tmp_path / "run")
  # Compiled without LLVM's costlier passes: both processes compile every program (27 CPU-s
  # for 40 steps, 46 with them); compared within tolerances only. 20 steps: two log
  # lines and an evaluation.
  result = subprocess.run(
      [os.path.join(REPO, "launch", "multiprocess.sh"), "2", f"--workdir={workdir}", *RUN,
       "--config.num_train_steps=20"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=with_fast_compile({**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                             "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}))
  assert result.returncode == 0, result.stderr[-5000:]
  assert "JAX process 1 of 2" in result.stderr and "4 device(s)" in result.stderr
  two_processes = records(workdir)
  expected = {(r["step"], r["split"]): r for r in records(stream_reference)}
  assert [(r["step"], r["split"]) for r in two_processes] == [
      (10, "train"), (20, "train"), (20, "test[:1000]")]
  for record in two_processes:
    reference = expected[(record["step"], record["split"])]
    np.testing.assert_allclose(record["loss"], reference["loss"], rtol=1e-3)
    if record["split"] == "test[:1000]":
      assert record["num_examples"] == 1000
      assert abs(record["accuracy"] - reference["accuracy"]) <= 2e-3  # two argmax flips


# ---- JPEG data, config and damaged data --------------------------------------------


def test_jpegs_of_varying_sizes_stream_in_the_memory_order_with_centre_crops(jpeg_dir):
  """Without the Inception crop, training and evaluation take the evaluation crop of
  the original image (research/data/image_crops.py; its geometry: tests/test_crops.py)."""
  config = _dataset_config("tiny_jpeg_images", jpeg_dir, eval_split="validation", image_size=16,
                           input="stream")
  _, memory_train, _ = datasets.load(config)
  source = data_source.from_config(config)
  assert source.info.image_shape == (16, 16, 3)
  mesh = mesh_lib.make_mesh()
  stream = stream_input.TrainStream(source.train, mesh, seed=0, batch_size=8, total_steps=6,
                                    start_step=0, log_every=6, crop="centre")
  (images, labels, _), = stream.batches(0, 6)  # 2 epochs of 3 steps
  stream.close()
  indices = datasets.batch_indices(0, 0, 6, 8, 24)
  np.testing.assert_array_equal(np.asarray(labels), memory_train.labels[indices])
  np.testing.assert_array_equal(np.asarray(images)[1],
                                source.train.read(indices[1], "centre")[0])
  (images, labels, mask), = source.eval_batches(mesh, 4)()
  np.testing.assert_array_equal(np.asarray(images).reshape(-1, 16, 16, 3)[:6],
                                source.eval.read(range(6), "centre")[0])
  np.testing.assert_array_equal(np.asarray(mask).ravel(), [1] * 6 + [0] * 2)


def test_unknown_input_kind_is_refused_with_the_accepted_ones():
  config = _config(**{"dataset.input": "disk"})
  with pytest.raises(UserError) as error:
    config_validation.validate(config)
  assert "--config.dataset.input='disk' is not accepted" in str(error.value)
  assert "'memory'" in str(error.value) and "'stream'" in str(error.value)


def test_damaged_shard_while_streaming_names_the_file_and_the_fix(fashion_mnist, tmp_path):
  from research.data import prepare_data

  prepared = os.fspath(prepare_data.builder_for("fashion_mnist", None).data_path)
  version_dir = tmp_path / "fashion_mnist" / os.path.basename(prepared)
  shutil.copytree(prepared, version_dir, copy_function=os.link)
  shard = version_dir / "fashion_mnist-train.array_record-00000-of-00001"
  content = shard.read_bytes()
  shard.unlink()  # break the hard link: the real file stays intact
  shard.write_bytes(content[:len(content) // 2])
  stream = _train_stream(_fashion_mnist_config(data_dir=str(tmp_path)), seed=0, batch_size=32,
                         total_steps=10, start_step=0, log_every=10)
  with pytest.raises(UserError) as error:
    next(stream.batches(0, 10))
  stream.close()
  message = str(error.value)
  assert "Cannot read split 'train' of fashion_mnist" in message
  assert "fashion_mnist-train.array_record-00000-of-00001" in message
  assert "delete that folder and run `make data`" in message
