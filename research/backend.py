"""Where a run executes, decided once: the forms the code takes on CPU and on accelerators.

`current()` reads JAX's backend and returns a `Backend`, which the training loop and
the models consult instead of asking JAX (or the config) again:
  * `conv_impl`: what `conv_impl="auto"` means (models/layers.py): im2col on CPU,
    XLA's own convolutions on GPU/TPU;
  * `static_trip_counts`: how a chunk of training steps is compiled. On CPU one loop
    takes its step count as an argument, so one program serves every chunk length. On
    GPU/TPU a loop whose count is traced makes XLA copy the loop condition to the host
    after every iteration (a device-to-host sync per step); there a chunk of n steps
    runs as calls of static power-of-two lengths (n's binary digits), each length
    compiled once and the calls dispatched without waiting (`piece_lengths`).
Both loop forms run the same steps and give bit-identical results (tests/test_steps.py).
  * `benchmark_microbatch`: whether `make bench` splits a large batch into micro-batches
    (on CPU, where small micro-batches stay in cache; accelerators measure the batch as given).
  * `init_compile_options`: how a run compiles the program that builds its initial state,
    which runs once; `analysis_compile_options`: how `make bench` compiles a program it
    only counts the FLOPs of and never runs.

Also here: the config's matmul precision (`numerics`), applied in one place around
everything a run traces, and the check that an accelerator present on the machine is
the one JAX uses (`check_accelerator_used`), and `planned_platform`, the platform JAX
will pick, read without starting JAX (the launchers split GPUs only when it is "gpu":
`python -c 'from research import backend; print(backend.planned_platform())'`).
"""

import contextlib
import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import shutil

from research.errors import UserError

# Config `matmul_precision` -> jax.default_matmul_precision. "default" is the backend's
# default: TF32 for float32 matmuls and convolutions on NVIDIA GPUs (Ampere and later),
# one bfloat16 pass on TPU, full float32 on CPU; "high" is 3 bfloat16 passes (TPU) / TF32
# (GPU); "highest" is full float32 everywhere (slower on accelerators).
MATMUL_PRECISIONS = ("default", "high", "highest")

# For tests only: the folder standing in for "/" when looking for accelerator devices.
DEVICE_ROOT_ENV = "RESEARCH_DEVICE_ROOT"


@dataclasses.dataclass(frozen=True)
class Backend:
  platform: str  # jax.default_backend(): "cpu", "gpu" (CUDA/ROCm) or "tpu"
  static_trip_counts: bool  # see the module docstring

  @property
  def conv_impl(self) -> str:
    """What conv_impl="auto" resolves to: XLA's CPU convolutions are slow (layers.py)."""
    return "im2col" if self.platform == "cpu" else "xla"

  def piece_lengths(self, count: int) -> list[int]:
    """Lengths of the compiled calls that run a chunk of `count` steps: [count] with a
    traced trip count; else count's binary digits, largest first (7 -> [4, 2, 1]), so
    that a run compiles at most log2(longest chunk) + 1 lengths."""
    if not self.static_trip_counts:
      return [count]
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]

  def benchmark_microbatch(self, batch_size: int, size: int) -> int:
    """The micro-batch size `make bench` runs `batch_size` as (0: whole): on CPU, batches
    above `size` (0: never) as micro-batches of `size`, a CPU cache trick; accelerators
    measure the batch as given, or their throughput would be understated."""
    return size if self.platform == "cpu" and size and batch_size > size else 0

  @property
  def init_compile_options(self) -> dict:
    """XLA options for the program that builds a run's initial state, which runs once, for
    milliseconds. On CPU: LLVM at optimization level 1, 2-3x quicker to compile than the
    default (ResNet-20: 1.6 s against 4.7; the seed CNN 0.55 against 1.7) and the same
    bits for every model of the zoo in float32 and bfloat16 (tests/test_backend.py checks
    two). Elsewhere the defaults."""
    return {"xla_backend_optimization_level": 1} if self.platform == "cpu" else {}

  @property
  def analysis_compile_options(self) -> dict:
    """XLA options for a program compiled only for its cost analysis, never run. On CPU:
    LLVM's cheapest code generation, half the compile time; the analysis reads the
    optimized HLO, which these options leave alone (tests/test_benchmark.py checks the
    counts are equal). Elsewhere the defaults (not measured there)."""
    if self.platform != "cpu":
      return {}
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def current(platform: str | None = None) -> Backend:
  """The Backend of JAX's default backend (or of `platform`, e.g. to test the GPU form on
  the CPU: `current("gpu")`)."""
  import jax

  platform = platform or jax.default_backend()
  return Backend(platform=platform, static_trip_counts=platform != "cpu")


def numerics(matmul_precision: str):
  """The context every run traces its programs in: the config's matmul precision for
  every dot and convolution (including the custom layers' own dot_generals)."""
  import jax

  if matmul_precision not in MATMUL_PRECISIONS:
    raise UserError(f"--config.matmul_precision={matmul_precision!r} is not accepted: use one "
                    f"of {', '.join(MATMUL_PRECISIONS)}.")
  if matmul_precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(matmul_precision)


# ---- Which platform JAX will use, and is an accelerator present that it does not? ----

ACCELERATORS = {  # kind -> (Makefile ACCEL, pip extra, JAX platform)
    "NVIDIA GPU": ("cuda12", "cuda12", "cuda"),
    "TPU": ("tpu", "tpu", "tpu"),
}
# JAX_PLATFORMS names -> the platform jax.default_backend() reports.
_PLATFORM_NAMES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


def installed_plugin(platform: str) -> str | None:
  """The name of an installed JAX plugin for `platform` ("cuda", "rocm" or "tpu"), found
  as JAX finds plugins (entry points in the `jax_plugins` group, modules of the
  `jax_plugins` namespace package; libtpu for TPUs), without importing it; else None."""
  names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
  try:
    import jax_plugins  # a namespace package: present only where some plugin is

    names += [os.path.basename(path) for folder in jax_plugins.__path__
              for path in glob.glob(os.path.join(folder, "*"))]
  except ImportError:
    pass
  found = [name for name in names if platform in name]
  if found:
    return found[0]
  if platform == "tpu" and importlib.util.find_spec("libtpu") is not None:
    return "libtpu"
  return None


def planned_platform(environ=os.environ) -> str:
  """"cpu", "gpu" or "tpu": what JAX will run on, read without starting JAX (launchers
  ask this before starting processes): JAX_PLATFORMS's first entry when set, else an
  accelerator whose plugin is installed, else the CPU. (A GPU machine without the CUDA
  plugin runs on the CPU: with --allow_cpu on purpose, else research.main refuses.)"""
  requested = [name.strip() for name in environ.get("JAX_PLATFORMS", "").split(",")
               if name.strip()]
  if requested:
    return _PLATFORM_NAMES.get(requested[0].lower(), requested[0].lower())
  if installed_plugin("cuda") or installed_plugin("rocm"):
    return "gpu"
  if installed_plugin("tpu"):
    return "tpu"
  return "cpu"


def present_accelerator() -> tuple[str, str] | None:
  """(kind, evidence) of an NVIDIA GPU or a TPU on this machine, else None. Looks at
  device files under the root folder (RESEARCH_DEVICE_ROOT, for tests; else "/")."""
  root = os.environ.get(DEVICE_ROOT_ENV) or "/"
  at = lambda *parts: os.path.join(root, *parts)
  gpus = sorted(glob.glob(at("dev", "nvidia[0-9]*")))
  if gpus:
    return "NVIDIA GPU", gpus[0]
  driver = at("proc", "driver", "nvidia", "gpus")
  if os.path.isdir(driver) and os.listdir(driver):
    return "NVIDIA GPU", driver
  if root == "/" and shutil.which("nvidia-smi"):
    return "NVIDIA GPU", shutil.which("nvidia-smi")
  tpus = sorted(glob.glob(at("dev", "accel[0-9]*")))
  if tpus:
    return "TPU", tpus[0]
  tpu_env = [name for name in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_NAME")
             if os.environ.get(name)]
  if tpu_env and os.path.isdir(at("dev", "vfio")):
    return "TPU", f"{at('dev', 'vfio')} with ${tpu_env[0]}"
  return None


def check_accelerator_used(platform: str, allow_cpu: bool) -> None:
  """Stops a run that would train on the CPU of a machine with a GPU or TPU, saying which
  happened: JAX's accelerator wheels are not installed (naming the command that fixes
  it), or its plugin is installed but failed to start (with JAX's reason). Allowed on
  purpose with --allow_cpu, or by JAX_PLATFORMS=cpu."""
  if platform != "cpu" or allow_cpu or os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return
  found = present_accelerator()
  if found is None:
    return
  kind, evidence = found
  accel, extra, jax_platform = ACCELERATORS[kind]
  plugin = installed_plugin(jax_platform)
  if plugin:  # installed, yet JAX fell back to the CPU: say why it did not start
    raise UserError(
        f"This machine has a {kind} ({evidence}) and JAX's {kind} plugin ({plugin}) is "
        f"installed, but it failed to start: {start_failure(jax_platform)} JAX runs on the "
        f"CPU instead. Fix the cause (for GPUs: `nvidia-smi` must work and the driver be new "
        f"enough for the CUDA of requirements-{accel}.lock; cuda13 needs CUDA 13 drivers), or "
        "pass --allow_cpu to train on the CPU on purpose.")
  raise UserError(
      f"This machine has a {kind} ({evidence}) but JAX runs on the CPU: its {kind} wheels are "
      f"not installed. Run `make train ACCEL={accel}` (or `.venv/bin/pip install -c "
      f"requirements.lock -c requirements-{accel}.lock 'jax[{extra}]'`; cuda13 for CUDA 13 "
      "drivers), or pass --allow_cpu to train on the CPU on purpose.")


def start_failure(jax_platform: str) -> str:
  """Why JAX's backend for `jax_platform` did not start, in JAX's own words."""
  import jax

  try:
    jax.devices(jax_platform)
  except RuntimeError as error:
    reason = str(error).split(". Available backends")[0]
    if reason.startswith("Unknown backend"):
      return (f"it registered no {jax_platform!r} backend (its initialize() failed, or JAX "
              "found no device files; JAX's warnings above say which).")
    return reason.rstrip(".") + "."
  return "it started only now (a first attempt failed)."
