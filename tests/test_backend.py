"""The CPU and accelerator forms of the run (research/backend.py), checked on the CPU:
the loop with a static trip count, the matmul precision, the accelerator-present check."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_main
from research import backend, mesh as mesh_lib
from research.data import datasets, data_source
from research.errors import UserError
from research.models.cnn import CNN
from research.run import run_info, steps, train

ACCELERATOR = backend.Backend(platform="gpu", static_trip_counts=True)  # forced on the CPU
CPU = backend.Backend(platform="cpu", static_trip_counts=False)


@pytest.mark.cpu_only
def test_backend_is_resolved_from_jax_and_pieces_are_binary_digits():
  assert backend.current() == CPU  # these tests run on the CPU (see conftest's cpu_only)
  assert backend.current("gpu") == ACCELERATOR and backend.current("tpu").static_trip_counts
  assert backend.current("tpu").conv_impl == "xla" and CPU.conv_impl == "im2col"
  assert ACCELERATOR.piece_lengths(7) == [4, 2, 1]
  assert ACCELERATOR.piece_lengths(469) == [256, 128, 64, 16, 4, 1]
  assert ACCELERATOR.piece_lengths(8) == [8] and CPU.piece_lengths(7) == [7]
  # At most log2(longest chunk) + 1 lengths are ever compiled.
  lengths = {n for count in range(1, 938) for n in ACCELERATOR.piece_lengths(count)}
  assert lengths == {2**k for k in range(10)}
  # `make bench` splits big batches into micro-batches on CPU only.
  assert CPU.benchmark_microbatch(256, 64) == 64 and CPU.benchmark_microbatch(64, 64) == 0
  assert CPU.benchmark_microbatch(256, 0) == 0 and ACCELERATOR.benchmark_microbatch(256, 64) == 0


@pytest.mark.cpu_only
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "resnet8"])  # Keras' initializers; the ResNets'
def test_the_initial_state_compiled_for_one_run_has_the_default_compiles_bits(name):
  """A run compiles its initial state with Backend.init_compile_options (quicker to
  compile): the parameters and optimizer state must be the default compile's, bit for bit,
  or a seed would give other weights than before (level 0 changes the ResNets' weights)."""
  import ml_collections

  from research import models

  config = ml_collections.ConfigDict({"name": name, **models.defaults(name)})
  model = models.build(config, num_classes=10)
  lowered = jax.jit(lambda: train.create_state(model, optax.adam(1e-3), (28, 28, 1), 0)).lower()
  options = backend.current().init_compile_options
  assert options  # on the CPU: not the defaults
  for quick, default in zip(jax.tree.leaves(lowered.compile(options)()),
                            jax.tree.leaves(lowered.compile()())):
    np.testing.assert_array_equal(quick, default)


@pytest.fixture(scope="module")
def small_run(fashion_mnist):
  """A small CNN, its optimizer, a 4,096-example split and the jitted train_many."""
  _, train_split, _ = fashion_mnist
  split = datasets.Split(train_split.images[:4096], train_split.labels[:4096])
  model, tx = CNN(num_classes=10, conv_features=(4, 8), dense_features=16), optax.adam(1e-3)
  train_many = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx),
                       donate_argnums=0)
  return model, tx, split, train_many


def _chunks(small_run, where, stops=(7, 12)):
  model, tx, split, train_many = small_run
  mesh = mesh_lib.make_mesh()
  feed = data_source.memory_feed(train_many, split, mesh, seed=0, batch_size=32, rows=8,
                                 where=where)
  state, step, metrics = train.create_state(model, tx, (28, 28, 1), 0), 0, []
  for stop in stops:
    state, chunk_metrics, _ = feed.chunk(state, step, stop)
    metrics.append(chunk_metrics)
    step = stop
  return jax.device_get(state), metrics


@pytest.mark.slow
def test_accelerator_loop_form_is_bit_identical_to_the_cpu_form(small_run):
  # Chunks of 7 and 5 steps: one traced-count call each (CPU), or calls of 4, 2, 1 and
  # 4, 1 steps (accelerators). Same steps, same batches: the same bits.
  cpu_state, cpu_metrics = _chunks(small_run, CPU)
  accelerator_state, accelerator_metrics = _chunks(small_run, ACCELERATOR)
  assert int(accelerator_state.step) == 12
  for a, b in zip(jax.tree.leaves(cpu_state), jax.tree.leaves(accelerator_state)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(cpu_metrics, accelerator_metrics):
    assert a["loss"].shape == b["loss"].shape
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


def _while_loops(compiled_text: str) -> list[str]:
  return [line for line in compiled_text.splitlines() if " while(" in line]


@pytest.mark.slow
def test_accelerator_form_compiles_a_loop_with_a_known_trip_count(small_run):
  model, tx, split, _ = small_run
  state = train.create_state(model, tx, (28, 28, 1), 0)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))
  indices = jnp.asarray(datasets.batch_indices(0, 0, 8, 32, len(split)))
  images, labels = jnp.asarray(split.images), jnp.asarray(split.labels)
  # The accelerator form: the trip count is the indices' row count, known to XLA.
  read_only = backend.current().analysis_compile_options  # compiled to be read, never run
  static = _while_loops(run.lower(state, images, labels, indices).compile(read_only).as_text())
  assert any('"known_trip_count":{"n":"8"}' in line for line in static), static
  # The CPU form: a traced count, which XLA cannot know (on GPU: a host sync per step).
  traced = _while_loops(
      run.lower(state, images, labels, indices, 5).compile(read_only).as_text())
  assert traced and not any("known_trip_count" in line for line in traced), traced


@pytest.mark.parametrize("precision, expected", [("highest", "HIGHEST"), ("high", "HIGH"),
                                                 ("default", None)])
def test_matmul_precision_reaches_every_dot_and_convolution(precision, expected):
  model = CNN(num_classes=10, conv_features=(4, 8), dense_features=16, conv_impl="xla")
  x = jnp.zeros((2, 28, 28, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with backend.numerics(precision):
    lowered = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x)))).lower(variables).as_text()
  ops = [line for line in lowered.splitlines()
         if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
  assert len([op for op in ops if "convolution" in op]) >= 4  # 2 layers: forward and gradients
  for op in ops:
    found = re.search(r"precision[ _a-z=]*\[(?:#stablehlo<precision )?(\w+)>?, "
                      r"(?:#stablehlo<precision )?(\w+)", op)
    if expected is None:
      assert found is None or found.groups() == ("DEFAULT", "DEFAULT"), op
    else:
      assert found and found.groups() == (expected, expected), op


def test_matmul_precision_is_validated_and_recorded_in_run_json(tmp_path):
  from configs import default
  from research.config import config_validation

  config = default.get_config()
  config.matmul_precision = "tf32"
  with pytest.raises(UserError, match=r"matmul_precision='tf32'.*'highest'"):
    config_validation.validate(config)
  with pytest.raises(UserError, match="matmul_precision"):
    backend.numerics("tf32")
  config.matmul_precision = "highest"
  config_validation.validate(config)
  with run_info.RunRecord(str(tmp_path), config, start_step=0, where=ACCELERATOR):
    pass
  with open(tmp_path / "run.json") as f:
    assert json.load(f)["numerics"] == {"matmul_precision": "highest", "conv_impl": "xla",
                                        "static_trip_counts": True}


# ---- An accelerator present but unused: detected with the real code on a fake root ----

def _fake_root(tmp_path, *device_files):
  for name in device_files:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
  return str(tmp_path)


@pytest.mark.parametrize("files, kind, command", [
    (["dev/nvidia0", "dev/nvidiactl"], "NVIDIA GPU", "make train ACCEL=cuda12"),
    (["proc/driver/nvidia/gpus/0000:00:04.0/information"], "NVIDIA GPU", "ACCEL=cuda12"),
    (["dev/accel0"], "TPU", "make train ACCEL=tpu")])
def test_a_present_accelerator_that_jax_does_not_use_stops_the_run(tmp_path, monkeypatch,
                                                                   files, kind, command):
  monkeypatch.setenv(backend.DEVICE_ROOT_ENV, _fake_root(tmp_path, *files))
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert backend.present_accelerator()[0] == kind
  with pytest.raises(UserError, match=re.escape(command)):
    backend.check_accelerator_used("cpu", allow_cpu=False)
  backend.check_accelerator_used("cpu", allow_cpu=True)  # on purpose
  backend.check_accelerator_used("gpu", allow_cpu=False)  # JAX uses it
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  backend.check_accelerator_used("cpu", allow_cpu=False)  # chosen explicitly


def _failing_plugin(folder) -> str:
  """A JAX plugin (module of the `jax_plugins` namespace) whose start fails, as the CUDA
  plugin's does on a machine with an old driver."""
  plugin = folder / "jax_plugins" / "xla_cuda12"
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text(
      "def initialize():\n  raise RuntimeError('CUDA driver version is insufficient')\n")
  return str(folder)


def test_launchers_platform_is_what_jax_will_use_not_whether_nvidia_smi_exists(tmp_path,
                                                                              monkeypatch):
  planned = lambda value: backend.planned_platform({"JAX_PLATFORMS": value})
  assert [planned(v) for v in ("cpu", "cuda", "cuda,cpu", "gpu", "tpu")] == [
      "cpu", "gpu", "gpu", "gpu", "tpu"]
  assert planned("") == "cpu" and backend.installed_plugin("cuda") is None  # no plugin here
  monkeypatch.syspath_prepend(_failing_plugin(tmp_path))  # found, not imported
  assert planned("") == "gpu" and backend.installed_plugin("cuda") == "xla_cuda12"


def test_a_plugin_that_is_installed_but_fails_is_named_with_its_reason(tmp_path, monkeypatch):
  monkeypatch.setenv(backend.DEVICE_ROOT_ENV, _fake_root(tmp_path / "root", "dev/nvidia0"))
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.syspath_prepend(_failing_plugin(tmp_path / "site"))

  def failed(platform=None):  # JAX's own words for a backend that failed to start
    raise RuntimeError(f"Backend '{platform}' failed to initialize: CUDA_ERROR_SYSTEM_DRIVER_"
                       "MISMATCH. Available backends are ['cpu']")

  monkeypatch.setattr(jax, "devices", failed)
  with pytest.raises(UserError) as refused:
    backend.check_accelerator_used("cpu", allow_cpu=False)
  message = str(refused.value)
  assert "plugin (xla_cuda12) is installed, but it failed to start: Backend 'cuda' failed to " \
         "initialize: CUDA_ERROR_SYSTEM_DRIVER_MISMATCH." in message
  assert "not installed" not in message and "--allow_cpu" in message


@pytest.mark.cpu_only
@pytest.mark.slow
def test_main_names_a_plugin_whose_initialize_fails(tmp_path):
  """A real (stand-in) plugin package: JAX imports it and its initialize() fails."""
  env = {backend.DEVICE_ROOT_ENV: _fake_root(tmp_path / "root", "dev/nvidia0"),
         "JAX_PLATFORMS": "", "PYTHONPATH": os.pathsep.join(
             [_failing_plugin(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
  result = run_main(tmp_path / "run", "--config=configs/default.py:smoke", env=env)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert "plugin (xla_cuda12) is installed, but it failed to start" in last
  assert "registered no 'cuda' backend" in last and "not installed" not in last
  assert not (tmp_path / "run").exists()


def test_no_accelerator_on_an_empty_root(tmp_path, monkeypatch):
  monkeypatch.setenv(backend.DEVICE_ROOT_ENV, _fake_root(tmp_path, "dev/null", "dev/vfio/0"))
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
  assert backend.present_accelerator() is None
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # a TPU VM's vfio devices
  assert backend.present_accelerator()[0] == "TPU"


@pytest.mark.cpu_only
@pytest.mark.slow
def test_main_stops_before_training_with_one_line_and_allow_cpu_goes_on(tmp_path):
  env = {backend.DEVICE_ROOT_ENV: _fake_root(tmp_path / "root", "dev/nvidia0"),
         "JAX_PLATFORMS": ""}
  workdir = tmp_path / "run"
  result = run_main(workdir, "--config=configs/default.py:smoke", env=env)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert "NVIDIA GPU" in last and "make train ACCEL=cuda12" in last and "--allow_cpu" in last
  assert not os.path.exists(workdir / "config.json")  # nothing trained, nothing written
  # --allow_cpu passes the check: the run gets as far as validating the config.
  result = run_main(workdir, "--config=configs/default.py:smoke", "--allow_cpu",
                    "--config.batch_size=0", env=env)
  assert result.returncode == 2 and "batch_size" in result.stderr.strip().splitlines()[-1]


# ---- Install: one lock per accelerator target ----------------------------------------

@pytest.mark.parametrize("accel, plugin", [("cuda12", "jax-cuda12-plugin"),
                                           ("cuda13", "jax-cuda13-plugin"), ("tpu", "libtpu")])
def test_accelerator_locks_pin_the_plugin_for_the_locked_jax_and_repeat_no_base_pin(accel, plugin):
  def pins(path):
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), path)) as f:
      return dict(line.strip().lower().replace("_", "-").split("==") for line in f
                  if "==" in line and not line.startswith("#"))

  base, extra = pins("requirements.lock"), pins(f"requirements-{accel}.lock")
  assert plugin in extra and not set(extra) & set(base)
  if accel != "tpu":
    assert extra[plugin] == base["jax"] == base["jaxlib"]


def test_make_installs_the_accelerators_lock_and_refuses_unknown_targets():
  import subprocess

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  dry = subprocess.run(["make", "-n", "test", "ACCEL=cuda12", "VENV=/nonexistent/venv"],
                       cwd=repo, capture_output=True, text=True)
  assert dry.returncode == 0, dry.stderr
  assert "-c requirements.lock" in dry.stdout and "-c requirements-cuda12.lock 'jax[cuda12]'" \
      in dry.stdout and "rm -rf /nonexistent/venv" in dry.stdout  # another ACCEL's venv goes
  wrong = subprocess.run(["make", "-n", "train", "ACCEL=rocm"], cwd=repo, capture_output=True,
                         text=True)
  assert wrong.returncode != 0 and "ACCEL=rocm is not accepted" in wrong.stderr


@pytest.mark.slow
def test_prepare_data_names_the_missing_original_files(tmp_path):
  from research.data import prepare_data

  (tmp_path / "gz").mkdir()
  (tmp_path / "gz" / "train-images-idx3-ubyte.gz").touch()
  with pytest.raises(UserError, match="lacks train-labels-idx1-ubyte.gz, t10k-images"):
    prepare_data.ensure_prepared("fashion_mnist", str(tmp_path / "tfds"),
                                 source_dir=str(tmp_path / "gz"))
