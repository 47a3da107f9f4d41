"""`make check-accelerator`: one command that checks a GPU/TPU machine end to end.

Runs, each in a child process (this parent never opens a device), and prints one
Markdown table (also written to --table):
  1. the backend and its devices;
  2. the seed recipe (configs/default.py) for 10 epochs in float32 and in bfloat16:
     training time without compilation, images/s, test accuracy;
  3. the Fashion-MNIST ResNet recipe's smoke run;
  4. a determinism pair: the same run twice with --config.deterministic=True, which
     must end with the same params_fingerprint;
  5. the model tests (pytest tests/test_models.py);
  6. the PyTorch reference (../shared/bench/torch_seed.py) on the same device, eager
     and with --compile, when torch is installed.
It needs no network: Fashion-MNIST is prepared from a folder of its original .gz files
(--data). On one H100 it aims to finish in under 8 minutes; `--smoke` shrinks every
run to a few steps (how tests/test_check_accelerator.py runs it on a CPU).

  python -m research.check_accelerator --data=/path/to/fashion-mnist-gz [--smoke]
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from research.config import command_line
from research.run import run_log
from research.tools import benchmark

_DATA = flags.DEFINE_string("data", "/usr/share/datasets/fashion-mnist",
                            "Folder of Fashion-MNIST's four original .gz files.")
_SHARED = flags.DEFINE_string("shared", "../shared/bench", "Folder of torch_seed.py.")
_TORCH_PYTHON = flags.DEFINE_string("torch_python", sys.executable,
                                    "A Python with torch installed (skipped if it has none).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Shrink every run to a few steps (a test of this "
                           "command, not of the machine).")
_TABLE = flags.DEFINE_string("table", "build/check_accelerator.md", "Where the table is written.")

REPO = benchmark.REPO
EPOCHS = 10
TRAIN_EXAMPLES = 60_000


@dataclasses.dataclass
class Row:
  check: str
  ok: bool | None  # None: skipped
  seconds: float | None = None  # training time without compilation (or the check's wall time)
  images_per_sec: float | None = None
  accuracy: float | None = None
  notes: str = ""

  def markdown(self) -> str:
    status = {True: "ok", False: "FAILED", None: "skipped"}[self.ok]
    cell = lambda value, digits: "" if value is None else f"{value:.{digits}f}"
    return (f"| {self.check} | {status} | {cell(self.seconds, 1)} | "
            f"{cell(self.images_per_sec, 0)} | {cell(self.accuracy, 4)} | {self.notes} |")


def _run(command: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
  env = {**os.environ, "RESEARCH_OFFLINE": "1"}  # never wait on a download
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env)


def _last_line(result: subprocess.CompletedProcess) -> str:
  lines = (result.stderr or result.stdout).strip().splitlines()
  return lines[-1][:200] if lines else f"exit status {result.returncode}"


def seconds_without_compile(records: list[dict]) -> float | None:
  """Training seconds of the run with the compilation taken out: the first log interval
  (which compiles the loop) is counted at the median per-step time of the others."""
  train = [r for r in records if r.get("split") == "train"]
  if len(train) < 2:
    return None
  steps = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + train, train)]
  seconds = [b["train_seconds"] - a["train_seconds"]
             for a, b in zip([{"train_seconds": 0.0}] + train, train)]
  per_step = statistics.median(s / n for s, n in zip(seconds[1:], steps[1:]))
  return sum(seconds[1:]) + per_step * steps[0]


def train(config: str, overrides: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
  """`python -m research.main` on a fresh workdir -> (the process, metrics.jsonl records)."""
  with tempfile.TemporaryDirectory(prefix="check-") as workdir:
    result = _run(command_line.main_command(config, workdir, overrides))
    records = run_log.read_records(os.path.join(workdir, run_log.METRICS_FILE))
  return result, records


def _shrunk(smoke: bool, steps: int) -> list[str]:
  """Overrides that cut a run to `steps` steps and a 1,000-example evaluation (--smoke)."""
  if not smoke:
    return []
  return [f"--config.num_train_steps={steps}", f"--config.log_every_steps={steps // 2}",
          f"--config.eval_every_steps={steps}", "--config.dataset.eval_split=test[:1000]",
          "--config.eval_batch_size=500"]


def seed_recipe(recipe: str, label: str, smoke: bool) -> Row:
  config, overrides = benchmark.RECIPES[recipe]
  batch = 32
  result, records = train(config, [*command_line.override_flags(overrides),
                                   f"--config.num_epochs={EPOCHS}", *_shrunk(smoke, 40)])
  if result.returncode != 0:
    return Row(label, False, notes=_last_line(result))
  seconds = seconds_without_compile(records)
  steps = max(r["step"] for r in records if r.get("split") == "train")
  return Row(label, True, seconds, steps * batch / seconds if seconds else None,
             run_log.final_evaluation(records).get("accuracy"),
             f"{steps} steps ({steps * batch / TRAIN_EXAMPLES:.2f} epochs), compile excluded")


def resnet_smoke(smoke: bool) -> Row:
  started = time.perf_counter()
  shrunk = _shrunk(smoke, 6) + (["--config.schedule.warmup_epochs=0",
                                  "--config.schedule.warmup_steps=2"] if smoke else [])
  result, records = train("configs/fashion_mnist_resnet.py:smoke", shrunk)
  if result.returncode != 0:
    return Row("ResNet recipe, smoke run", False, notes=_last_line(result))
  return Row("ResNet recipe, smoke run", True, time.perf_counter() - started, None,
             run_log.final_evaluation(records).get("accuracy"), "wall time, compile included")


def determinism_pair(smoke: bool) -> Row:
  fingerprints = []
  for _ in range(2):
    result, records = train("configs/default.py:smoke",
                            ["--config.deterministic=True", *_shrunk(smoke, 20)])
    if result.returncode != 0:
      return Row("determinism pair (deterministic=True)", False, notes=_last_line(result))
    fingerprints.append(run_log.final_evaluation(records).get("params_fingerprint"))
  same = fingerprints[0] is not None and fingerprints[0] == fingerprints[1]
  return Row("determinism pair (deterministic=True)", same,
             notes=f"params_fingerprint {fingerprints[0]}"
             + ("" if same else f" vs {fingerprints[1]}"))


def model_tests(smoke: bool) -> Row:
  started = time.perf_counter()
  command = [sys.executable, "-m", "pytest", "tests/test_models.py", "-q", "-p", "no:cacheprovider",
             "-p", "no:xdist"]
  if smoke:
    command += ["-k", "seed_cnn_has_the_keras"]
  result = _run(command)
  summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else _last_line(result)
  return Row("model tests (tests/test_models.py)", result.returncode == 0,
             time.perf_counter() - started, notes=summary.strip("= "))


def torch_reference(device: str | None, compiled: bool, smoke: bool) -> Row:
  label = f"PyTorch reference ({device or 'none'}{', torch.compile' if compiled else ', eager'})"
  if device is None:
    return Row(label, None, notes="torch_seed.py runs on CUDA or the CPU, not on this backend")
  try:
    has_torch = _run([_TORCH_PYTHON.value, "-c", "import torch"]).returncode == 0
  except OSError:  # no such Python
    has_torch = False
  if not has_torch:
    return Row(label, None, notes=f"torch is not installed for {_TORCH_PYTHON.value}")
  if smoke:
    return Row(label, None, notes="--smoke (a full epoch at least)")
  script = os.path.join(os.path.abspath(_SHARED.value), "torch_seed.py")
  with tempfile.TemporaryDirectory() as tmp:
    command = [_TORCH_PYTHON.value, script, "--device", device, "--epochs", str(EPOCHS),
               "--data", os.path.abspath(_DATA.value), "--json", os.path.join(tmp, "r.jsonl")]
    result = _run(command + (["--compile"] if compiled else []))
  if result.returncode != 0:
    return Row(label, False, notes=_last_line(result))
  lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
  found = json.loads(lines[-1][len("RESULT "):])
  # Its epochs 2..10 at their median, and the first at that median too: no compile.
  seconds = found["median_epoch_2_on_s"] * EPOCHS
  return Row(label, True, seconds, EPOCHS * TRAIN_EXAMPLES / seconds, found["test_accuracy"],
             "10 epochs at the median of epochs 2-10")


def prepare_data() -> Row:
  result = _run([sys.executable, "-m", "research.prepare_data", "--dataset=fashion_mnist",
                 f"--source_dir={_DATA.value}"])
  return Row("Fashion-MNIST prepared", result.returncode == 0,
             notes=f"from {_DATA.value}" if result.returncode == 0 else _last_line(result))


def main(argv):
  del argv
  started = time.perf_counter()
  smoke = _SMOKE.value
  rows = [prepare_data()]
  machine = benchmark.in_child("machine", False)  # its table shows no matmul peak
  platform = machine["platform"]
  rows.append(Row("backend", platform != "cpu" or smoke,
                  notes=f"{platform}: {len(machine['devices'])} x {machine['device_kind']}"))
  checks = [lambda: seed_recipe("seed", "seed recipe, float32", smoke),
            lambda: seed_recipe("seed_bf16", "seed recipe, bfloat16", smoke),
            lambda: resnet_smoke(smoke), lambda: determinism_pair(smoke),
            lambda: model_tests(smoke)]
  device = {"gpu": "cuda", "cpu": "cpu"}.get(platform)
  checks += [lambda: torch_reference(device, False, smoke),
             lambda: torch_reference(device, True, smoke)]
  for check in checks:
    rows.append(check())
    print(rows[-1].markdown(), file=sys.stderr, flush=True)
  table = markdown(rows, machine, time.perf_counter() - started, smoke)
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(_TABLE.value)), exist_ok=True)
  with open(_TABLE.value, "w") as f:
    f.write(table + "\n")
  if not all(row.ok is not False for row in rows):
    sys.exit(1)


def markdown(rows: list[Row], machine: dict, seconds: float, smoke: bool) -> str:
  lines = [f"Accelerator check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
           f"{len(machine['devices'])} x {machine['device_kind']} ({machine['platform']}), "
           f"{machine['cpu_count']} CPU cores; took {seconds / 60:.1f} min"
           + (" (--smoke: shrunk runs, not figures)" if smoke else "") + ".", "",
           "| check | result | seconds | images/s | test accuracy | notes |",
           "|---|---|---|---|---|---|"]
  return "\n".join(lines + [row.markdown() for row in rows])


if __name__ == "__main__":
  app.run(main)
