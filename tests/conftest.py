"""Shared fixtures: the real Fashion-MNIST (prepared offline by TFDS) and helpers.

The suite runs on any JAX backend. Tests of CPU-only forms (YNNPACK fusions, "auto"
meaning im2col, ...) carry `@pytest.mark.cpu_only` and are skipped elsewhere, with the
reason; tests that force several host devices run their subprocesses on the CPU
platform, the only one those flags apply to.
"""

import collections
import io
import json
import os
import subprocess
import sys
import time
import typing

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This repository's modules compiled to bytecode once, by the first process importing
# them: where PYTHONDONTWRITEBYTECODE is set (container images often set it), each of the
# suite's hundreds of Python processes compiled research/, configs/ and tests/ again,
# about 0.1 s each. The installed packages have their bytecode from `make`'s install.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# On a GPU, JAX takes 75% of its memory at start: the test process and the runs it
# starts would not fit side by side.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _share_compiled_programs() -> None:
  """JAX's persistent compilation cache for this test process, its xdist workers and every
  run they start (they inherit the environment): the smoke runs compile the same programs
  dozens of times, and a cached program is the one XLA would build again (the key holds
  the program, the XLA flags, the backend and JAX's version), so bits do not change.

  One folder per `pytest` session, made by the process collecting first (the controller
  under xdist: its workers inherit the variable), so a fresh clone pays every compile once.
  JAX_COMPILATION_CACHE_DIR set beforehand is used instead and kept (re-runs then start warm).
  """
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="research-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    owner = os.getpid()
    # Removed by the process that made it (workers and runs exit before the controller).
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
  # Cache every program, however quick to compile or small: the defaults (at least 1 s of
  # compiling) would skip most of the smoke programs.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  # No size limit in the test processes themselves: with one, JAX locks the folder and
  # lists every entry around each write, and the in-process tests compile hundreds of small
  # programs (the likely cause of test_models taking 3.6x as long in one run; not yet
  # measured apart from the helpers' load). Their entries have no access-time file;
  # each run gives them one when it starts (research/run/compile_cache.py).


_share_compiled_programs()


# One-test files of a minute or more. xdist hands files out by test count, most first
# (its default, which `make test` turns off), so these came last and often left one worker
# running one of them alone for 80-100 s at the end; started first, they share the cores
# with the other worker's files.
START_FIRST = ("test_bench_command.py", "test_check_accelerator.py", "test_prepare_data.py",
               "test_bench_compare_command.py")


def pytest_collection_modifyitems(config, items):
  """Orders the files (START_FIRST, then by test count, most first); skips `cpu_only`
  tests when JAX's backend is not the CPU (research/backend.py)."""
  counts = collections.Counter(item.path.name for item in items)
  first = {name: rank for rank, name in enumerate(START_FIRST)}
  items.sort(key=lambda item: (first.get(item.path.name, len(first)), -counts[item.path.name],
                               item.path.name))  # stable: a file's tests keep their order
  marked = [item for item in items if item.get_closest_marker("cpu_only")]
  if not marked:
    return
  from research import backend

  platform = backend.current().platform
  if platform == "cpu":
    return
  for item in marked:
    item.add_marker(pytest.mark.skip(
        reason=f"cpu_only: checks a CPU-specific form; JAX runs on {platform} here"))


# XLA's CPU backend without its costlier LLVM optimizations: about half the compile time
# for the same programs, less optimized machine code. For runs whose speed is not what is
# tested and that are not compared bit for bit with a run compiled without it (the flags
# are part of the compilation cache's key too, so such runs share no programs).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_fast_compile(env: dict | None = None) -> dict:
  """`env` (os.environ if None) with FAST_COMPILE added to its XLA_FLAGS."""
  env = dict(os.environ if env is None else env)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
  return env


@pytest.fixture
def cheap_compiles():
  """FAST_COMPILE in this process, by JAX's own switch, for one test: for tests that compile
  whole models and compare them within tolerances, never bit for bit with a run compiled
  otherwise (the setting is part of the compilation cache's key). Not for tests that run
  many steps: the less optimized code runs them slower (a 60-step run took 3x as long)."""
  import jax

  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _cpu_if_forced_devices(env: dict) -> dict:
  """--xla_force_host_platform_device_count makes CPU devices only: such a run must be
  on the CPU platform on a GPU/TPU machine too."""
  if "xla_force_host_platform_device_count" in (env or {}).get("XLA_FLAGS", ""):
    return {"JAX_PLATFORMS": "cpu", **env}
  return env


@pytest.fixture(scope="session")
def fashion_mnist():
  """(info, train, test) of the real dataset, prepared from Debian's files if needed."""
  import ml_collections

  from research.data import datasets

  config = ml_collections.ConfigDict(
      {"name": "fashion_mnist", "data_dir": "", "train_split": "train", "eval_split": "test"})
  return datasets.load(config)


def run_main(workdir, *flags, timeout=600, env=None):
  """Runs `python -m research.main` as a user would; returns the CompletedProcess."""
  command = [sys.executable, "-m", "research.main", f"--workdir={workdir}", *flags]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(_cpu_if_forced_devices(env) or {})})


class Ran(typing.NamedTuple):
  """What `run_here` saw: the exit status `research.main` would have ended with, and its
  stderr (the run's log lines; for a UserError, main's last line "error: MESSAGE")."""
  returncode: int
  stderr: str


def run_here(workdir, *flags) -> Ran:
  """`run_main(workdir, *flags)`'s run in this process, for runs whose subject is not the
  command line: the flags parsed as main parses them (`parse_as_main`), then what main
  runs once its process is set up (`research.program.train_or_evaluate`). It saves a
  fresh interpreter's imports and JAX start-up (~5 CPU-s a run). An exception other than
  a UserError propagates."""
  import logging

  from research import program
  from research.errors import UserError

  lines = io.StringIO()
  handler = logging.StreamHandler(lines)
  handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.addHandler(handler)
  absl_logger.setLevel(logging.INFO)
  try:
    config, parsed = parse_as_main(
        [sys.executable, "-m", "research.main", f"--workdir={workdir}", *flags])
    program.train_or_evaluate(parsed["workdir"].value, config, parsed["mode"].value,
                              parsed["allow_config_change"].value)
    return Ran(0, lines.getvalue())
  except UserError as error:
    return Ran(error.exit_code, f"{lines.getvalue()}error: {error}\n")
  finally:
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(level)


def parse_as_main(command: list[str]):
  """(config, flag values) that `python -m research.main` makes of `command` (an argv as
  command_line.main_command builds it), parsed in this process: main's own flags and the
  --config parser it uses (command_line.parse). A mistake raises main's UserError."""
  import copy

  from absl import flags

  from research import main  # defines its flags in absl's FLAGS
  from research.config import command_line

  assert command[:3] == [sys.executable, "-m", "research.main"], command[:3]
  flag_values = flags.FlagValues()
  for flag in flags.FLAGS.get_flags_for_module(main):  # copies: this parse leaves FLAGS alone
    flag_values[flag.name] = copy.deepcopy(flag)
  remaining = command_line.parse(command[2:], flag_values)  # argv[0]: the program
  assert remaining == ["research.main"], remaining
  return flag_values["config"].value, flag_values


# Fields of metrics.jsonl that measure time: they differ between otherwise identical runs.
TIMING_FIELDS = {"elapsed", "steps_per_sec", "train_seconds", "input_sec", "compute_sec"}


def records(workdir) -> list[dict]:
  """metrics.jsonl of `workdir` without its timing fields."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in f]


def last_train_step(workdir) -> int:
  try:
    return max(r["step"] for r in records(workdir) if r["split"] == "train")
  except (OSError, ValueError):  # no file or no train line yet, or a line being written
    return 0


def interrupt_at_step(workdir, flags, sig, at_step, after_checkpoint=None) -> tuple[int, str]:
  """Starts `research.main` on `workdir`, sends `sig` once it has logged `at_step` and,
  if `after_checkpoint` is given, finished writing that step's checkpoint (Orbax renames
  a finished one into place, and saves in the background: on a loaded machine the log
  can run ahead of it); or once the run ended. Returns (exit code, stderr)."""
  command = [sys.executable, "-m", "research.main", f"--workdir={workdir}", *flags]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  saved = os.path.join(workdir, "checkpoints", str(after_checkpoint))

  def waiting() -> bool:
    return last_train_step(workdir) < at_step or (
        after_checkpoint is not None and not os.path.isdir(saved))

  deadline = time.time() + 300
  while waiting() and process.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  process.send_signal(sig)
  _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """One short real run (300 steps, ~0.8 test accuracy, steps 100-150 profiled) shared by
  the report, prediction, run.json, TensorBoard and documentation tests: trained once per
  `pytest` session, under xdist by the first worker to need it while the others wait on
  its lock (pytest-xdist's recipe), in the folder the session's workers share. Its tests
  read it; the report test alone writes into it (report/, which the others never read)."""
  import filelock

  # The workers' folders are popen-gwN in the session's own folder; without xdist,
  # that parent holds other sessions' folders too.
  root = tmp_path_factory.getbasetemp()
  root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
  workdir = root / "trained" / "run"
  with filelock.FileLock(str(root / "trained.lock")):
    if not (workdir / "run.json").exists():
      result = run_here(str(workdir), "--config=configs/default.py:smoke",
                        "--config.profile_steps=100,50")
      assert result.returncode == 0, result.stderr[-3000:]
  status = json.loads((workdir / "run.json").read_text())["status"]
  assert status == "finished", f"the shared run in {workdir} ended {status} (on another worker)"
  return str(workdir)


def tree_digest(directory) -> dict:
  """{relative path: sha256} of every file under `directory`: equal digests mean untouched."""
  import hashlib

  digest = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digest
