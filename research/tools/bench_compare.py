"""`make bench-compare`: our trainer against the Keras and PyTorch references, side by side.

Rounds are interleaved (the order rotates each round) so that a noisy, shared machine
affects every contestant alike. Each round trains the seed recipe for `--epochs` epochs
in each framework; we report the steady epoch time (median of epochs 2..E), the ratio
peer / ours for every round and the median ratio, test accuracy and peak memory.
Then images/s at several batch sizes (`--batch_sizes`, `--microbatch` as for
research.tools.benchmark). Markdown goes to stdout and build/bench_compare.md.

  python -m research.bench_compare --keras_python=build/bench-env/tf/bin/python \
      --torch_python=build/bench-env/torch/bin/python --shared=../shared/bench
"""

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from research.config import command_line
from research.tools import benchmark

_KERAS = flags.DEFINE_string("keras_python", "build/bench-env/tf/bin/python",
                             "Python of the environment with tensorflow-cpu (Keras 3).")
_TORCH = flags.DEFINE_string("torch_python", "build/bench-env/torch/bin/python",
                             "Python of the environment with torch 2.13 CPU.")
_SHARED = flags.DEFINE_string("shared", "../shared/bench", "Folder of keras_seed.py, torch_seed.py.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per training run (>= 2: epoch 1 compiles).")
_PEERS = flags.DEFINE_list("peers", ["keras", "torch"], "Which references run: keras, torch.")
_STEPS = flags.DEFINE_integer("throughput_steps", 100, "Timed steps per batch size (peers).")


def _run(command: list[str]) -> tuple[list[dict], float]:
  """Runs a command; returns its RESULT json lines and its peak RSS in MB."""
  process = subprocess.Popen(command, cwd=benchmark.REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  out_lines = []
  for line in process.stdout:
    out_lines.append(line)
  _, status, usage = os.wait4(process.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
  results = [json.loads(line[len("RESULT "):]) for line in out_lines if line.startswith("RESULT ")]
  return results, usage.ru_maxrss / 1024


# Ours: the seed recipe as `make train` runs it, and with its config switch for
# bfloat16 matmul operands (float32 accumulation), the one change of arithmetic.
OURS = {"ours (JAX)": "seed", "ours (JAX, bf16)": "seed_bf16"}  # name: benchmark.RECIPES key
PEERS = ("Keras/TF", "PyTorch")
PEER_FLAGS = {"keras": "Keras/TF", "torch": "PyTorch"}  # --peers value: name


def ours(epochs: int, recipe: str) -> dict:
  config_file, overrides = benchmark.RECIPES[recipe]
  run = benchmark.training_run(config_file, command_line.override_flags(
      {"num_epochs": epochs, **overrides}))
  return {"steady_epoch_s": run["median_epoch_seconds"], "first_epoch_s": run["first_epoch_seconds"],
          "test_accuracy": run["test_accuracy"], "peak_rss_mb": run["peak_rss_mb"]}


def peer(python: str, script: str, epochs: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    results, rss = _run([python, os.path.join(_SHARED.value, script), "--epochs", str(epochs),
                         "--json", os.path.join(tmp, "r.jsonl")])
  result = results[-1]
  return {"steady_epoch_s": result["median_epoch_2_on_s"], "first_epoch_s": result["first_epoch_s"],
          "test_accuracy": result["test_accuracy"], "peak_rss_mb": rss}


def main(argv):
  del argv
  unknown = set(_PEERS.value) - set(PEER_FLAGS)
  if unknown:
    print(f"error: --peers={','.join(_PEERS.value)} is not accepted: name keras, torch or both, "
          "e.g. --peers=keras", file=sys.stderr)
    sys.exit(2)
  peers = [PEER_FLAGS[key] for key in PEER_FLAGS if key in _PEERS.value]
  contestants = {
      **{name: functools.partial(ours, _EPOCHS.value, recipe) for name, recipe in OURS.items()},
      "Keras/TF": lambda: peer(_KERAS.value, "keras_seed.py", _EPOCHS.value),
      "PyTorch": lambda: peer(_TORCH.value, "torch_seed.py", _EPOCHS.value),
  }
  contestants = {name: run for name, run in contestants.items()
                 if name in OURS or name in peers}
  names = list(contestants)
  rounds = []
  for index in range(_ROUNDS.value):
    order = names[index % len(names):] + names[:index % len(names)]
    results = {}
    for name in order:
      results[name] = contestants[name]()
      print(f"round {index + 1}: {name} {results[name]}", file=sys.stderr, flush=True)
    rounds.append(results)

  throughput = {name: {} for name in contestants}
  batches = ",".join(benchmark.BATCH_SIZES.value)
  if "PyTorch" in peers:
    for row in _run([_TORCH.value, os.path.join(_SHARED.value, "torch_seed.py"), "--bench",
                     batches, "--steps", str(_STEPS.value), "--windows", "3"])[0]:
      throughput["PyTorch"][row["batch"]] = row["median_window_img_per_s"]
  if "Keras/TF" in peers:
    for row in _run([_KERAS.value, os.path.join(benchmark.REPO, "research", "peers",
                                                "keras_throughput.py"),
                     "--batches", batches, "--steps", str(_STEPS.value)])[0]:
      throughput["Keras/TF"][row["batch"]] = row["images_per_sec"]
  for name, recipe in OURS.items():
    config_file, overrides = benchmark.RECIPES[recipe]
    for batch in benchmark.BATCH_SIZES.value:
      throughput[name][int(batch)] = benchmark.throughput(
          config_file, {**overrides, **benchmark.microbatch_overrides(int(batch))},
          int(batch), count_flops=False)["images_per_sec"]

  report = {"rounds": rounds, "throughput": throughput, "epochs": _EPOCHS.value,
            "microbatch": benchmark.MICROBATCH.value,
            "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count()}
  table = markdown(report)
  print(table)
  os.makedirs(benchmark.OUT_DIR.value, exist_ok=True)
  with open(os.path.join(benchmark.OUT_DIR.value, "bench_compare.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(benchmark.OUT_DIR.value, "bench_compare.json"), "w") as f:
    json.dump(report, f, indent=2)


def markdown(report: dict) -> str:
  rounds = report["rounds"]
  names = list(rounds[0])
  pairs = [(peer_name, mine) for mine in OURS for peer_name in PEERS if peer_name in names]
  lines = [f"Seed recipe (batch 32, Adam), {report['epochs']} epochs per run, {len(rounds)} "
           f"interleaved rounds, {report['cpu_count']} CPU cores, {report['date']}.", "",
           "| round | " + " | ".join(f"{n} s/epoch" for n in names) + " | " +
           " | ".join(f"{p} ÷ {m}" for p, m in pairs) + " |",
           "|" + "---|" * (len(names) + len(pairs) + 1)]
  ratios = {pair: [] for pair in pairs}
  for index, results in enumerate(rounds, start=1):
    for p, m in pairs:
      ratios[p, m].append(results[p]["steady_epoch_s"] / results[m]["steady_epoch_s"])
    lines.append(f"| {index} | " + " | ".join(f"{results[n]['steady_epoch_s']:.2f}" for n in names)
                 + " | " + " | ".join(f"{ratios[pair][-1]:.2f}x" for pair in pairs) + " |")
  median = lambda name, key: statistics.median(r[name][key] for r in rounds)
  lines.append("| **median** | " + " | ".join(f"**{median(n, 'steady_epoch_s'):.2f}**" for n in names)
               + " | " + " | ".join(f"**{statistics.median(ratios[pair]):.2f}x**" for pair in pairs)
               + " |")
  lines += ["", "| | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1),
            "| first epoch s (compile incl.) | " +
            " | ".join(f"{median(n, 'first_epoch_s'):.1f}" for n in names) + " |",
            f"| test accuracy after {report['epochs']} epochs | " +
            " | ".join(f"{median(n, 'test_accuracy'):.4f}" for n in names) + " |",
            "| peak RSS MB | " + " | ".join(f"{median(n, 'peak_rss_mb'):.0f}" for n in names) + " |"]
  lines.append("")
  lines.append("Images/s: steady state of the training step. Ours runs batches above "
               f"{report['microbatch']} as micro-batches of that size (`--config.microbatch_size`: "
               "the same gradient up to float rounding).")
  lines += ["", "| batch | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
  for batch in sorted(next(iter(report["throughput"].values()))):
    lines.append(f"| {batch} | " + " | ".join(
        f"{report['throughput'][n].get(batch, float('nan')):.0f}" for n in names) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
