"""`make bench`: how fast and how close to the machine's peak our training runs.

For each benchmarked recipe it prints one Markdown table row (and writes the
table to build/bench.md, the raw numbers to build/bench.json):
  * seconds per epoch: the first (compile included) and the median of the rest,
    from a real `research.main` run (timings from metrics.jsonl's `train_seconds`);
  * final test accuracy and peak memory (max RSS) of that run;
  * images/s at batch 32, 256 and 1024 (steady state, median of windows);
  * FLOPs per image of one train step, from XLA's cost analysis: the model's (its plain
    lax.conv form) and, in brackets, those our fast CPU form executes;
  * achieved GFLOP/s (model FLOPs) and its fraction of the device's peak: on CPU the fp32
    matmul rate measured in the same run; on a GPU or TPU the maker's peak for the
    recipe's arithmetic (`PEAKS`: bfloat16, or TF32 for float32 at the default precision).

Every measurement runs in a child process (`--measure`); this parent never imports
JAX: a TPU has one owner, and JAX takes 75% of a GPU's memory in the first process
that opens it.

  python -m research.benchmark [--recipes=seed,seed_bf16,resnet20] [--resnet_epochs=2]
      [--resnet_width=16]
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

import research
from research.config import command_line

_RECIPES = flags.DEFINE_list("recipes", ["seed"], "Which recipes to benchmark: seed "
                             "(configs/default.py), seed_bf16 (the same, model.dtype=bfloat16), "
                             "resnet20 (configs/fashion_mnist_resnet.py with ResNet-20).")
BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "256", "1024"], "Throughput batch sizes.")
_EPOCHS = flags.DEFINE_integer("resnet_epochs", 2,
                               "Epochs of the ResNet-20 training run (its recipe warms up for 1).")
_WIDTH = flags.DEFINE_integer(
    "resnet_width", 16, "Width of the ResNet-20 recipe, in its throughput and training run "
    "alike (16: the classic; fewer for a quick bench, e.g. in the tests).", lower_bound=1)
OUT_DIR = flags.DEFINE_string("out", "build", "Where bench.md and bench.json go.")
MICROBATCH = flags.DEFINE_integer("microbatch", 64, "config.microbatch_size for throughput "
                                   "batches larger than this, on CPU only (0: none).")
THROUGHPUT_IMAGES = flags.DEFINE_integer(
    "throughput_images", 4096, "Images per timed window of the throughput measurement (five "
    "windows after the compile); fewer for a quick bench, e.g. in the tests.", lower_bound=1)
TRAIN_FLAGS = flags.DEFINE_multi_string(
    "train_flag", [], "A --config.FIELD=VALUE flag added to every training run, after the "
    "recipe's (repeatable): a quick bench, e.g. --train_flag=--config.num_epochs=2.")
_MEASURE = flags.DEFINE_string("measure", None, "Internal: the JSON of one measurement to run "
                               "in this (child) process; prints RESULT {json}.")

RECIPES = {
    # name: (config file, overrides applied to it)
    "seed": ("configs/default.py", {}),
    # The seed recipe with bfloat16 matmul operands (models/layers.py).
    "seed_bf16": ("configs/default.py:model=cnn", {"model.dtype": "bfloat16"}),
    # The classic ResNet-20 (width 16, full-resolution stem, float32) in the Fashion-MNIST
    # ResNet recipe's optimizer and augmentation; a log line at every epoch end (batch 128).
    "resnet20": ("configs/fashion_mnist_resnet.py", {
        "model.name": "resnet20", "model.width": 16, "model.stem": "cifar",
        "model.dtype": "float32", "log_every_steps": 60_000 // 128}),
}
REPO = research.REPOSITORY

# Dense peak TFLOP/s per chip (no structured sparsity): (bfloat16, TF32, float32), by
# jax device_kind, first match wins. TF32 is what float32 matmuls and convolutions run as
# on NVIDIA GPUs at matmul_precision="default"; a TPU runs them as bfloat16 passes (one at
# "default"), so its float32 runs are measured against the bfloat16 peak (TF32: None).
# Sources: NVIDIA datasheets (H100/H200: "H100 Tensor Core GPU" and "H200 Tensor Core GPU",
# SXM figures, sparsity figures halved; A100: "A100 Tensor Core GPU" datasheet; L4: "L4
# Tensor Core GPU" datasheet, 242/120 with sparsity); Google Cloud TPU system architecture
# pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): peak bf16 compute per chip.
PEAKS = [
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", (989.4, 494.7, 66.9)),  # SXM ("NVIDIA H200"); same compute as H100 SXM
    ("A100", (312.0, 156.0, 19.5)),  # SXM4 and PCIe
    ("L4", (121.0, 60.0, 30.3)),
    ("TPU v4", (275.0, None, None)),
    ("TPU v5 lite", (197.0, None, None)),  # v5e
    ("TPU v5e", (197.0, None, None)),
    ("TPU v5p", (459.0, None, None)),
    ("TPU v5", (459.0, None, None)),  # v5p reports "TPU v5"
    ("TPU v6 lite", (918.0, None, None)),  # v6e (Trillium)
    ("TPU v6e", (918.0, None, None)),
]


def device_peak_gflops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(the maker's peak GFLOP/s for `dtype` arithmetic on this device, its name), or
  (None, why) for a device not in PEAKS."""
  for pattern, (bf16, tf32, _) in PEAKS:
    if pattern.lower() in device_kind.lower():
      if dtype == "bfloat16" or tf32 is None:
        return bf16 * 1e3, f"{pattern} bf16 peak"
      return tf32 * 1e3, f"{pattern} TF32 peak"
  return None, f"no peak known for {device_kind!r}"


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
  """Best fp32 matmul rate of this machine through XLA (2*n^3 FLOPs per product)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def load_config(config_file: str, overrides: dict):
  """The ConfigDict `--config=config_file --config.KEY=VALUE...` would give."""
  import importlib.util

  path, _, arg = config_file.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.update_from_flattened_dict(overrides)
  return config


def training_run(config_file: str, overrides: list[str]) -> dict:
  """Runs `research.main` in a subprocess; returns epoch times, accuracy, peak RSS."""
  from research.run import run_log

  with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
    command = command_line.main_command(config_file, workdir, [*overrides, *TRAIN_FLAGS.value])
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    records = run_log.read_records(os.path.join(workdir, run_log.METRICS_FILE))
  return {"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
          **epoch_times(records)}


def epoch_times(records: list[dict]) -> dict:
  """First and median later epoch times from the `train_seconds` of epoch-end lines."""
  from research.run import run_log

  train = [r for r in records if not run_log.is_evaluation(r)]
  ends = [r["train_seconds"] for r in train if float(r["epoch"]).is_integer()]
  epochs = [b - a for a, b in zip([0.0] + ends, ends)]
  return {"epoch_seconds": epochs,
          "first_epoch_seconds": epochs[0] if epochs else None,
          "median_epoch_seconds": statistics.median(epochs[1:]) if len(epochs) > 1 else None,
          "test_accuracy": run_log.final_evaluation(records).get("accuracy")}


def throughput(config_file: str, overrides: dict, batch_size: int,
               count_flops: bool = True) -> dict:
  """Steady-state images/s of the compiled train loop at `batch_size`, and XLA's FLOPs
  (without `count_flops`: None; counting compiles the step once or twice more)."""
  import jax

  from research import mesh as mesh_lib
  from research.data import datasets, data_source
  from research.run import step_schedule, steps, train

  config = load_config(config_file, {**overrides, "batch_size": batch_size})
  microbatches = step_schedule.microbatch_count(config)
  # The compute alone: batches gathered on the device, whatever input the config names
  # (`make bench-input` measures the streamed input).
  source = data_source.MemorySource(config.dataset, config.dataset.eval_split, train=True)
  info, train_split = source.info, source.train
  mesh = mesh_lib.make_mesh()
  model, tx, init_fn, _ = train.build_model_and_state(config, info, mesh)
  state = init_fn(config.seed)
  images = mesh_lib.put_replicated(train_split.images, mesh)
  labels = mesh_lib.put_replicated(train_split.labels, mesh)
  steps_per_call = max(2, THROUGHPUT_IMAGES.value // batch_size)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx,
                                  microbatches=microbatches), donate_argnums=0)

  indices = datasets.batch_indices(config.seed, 0, steps_per_call, batch_size, len(train_split))
  batch = train_split.images[indices[0]], train_split.labels[indices[0]]
  flops_per_image, executed = (flops_per_image_of(config, info, mesh, model, tx, state, batch)
                               if count_flops else (None, None))
  state, metrics = run(state, images, labels, indices)  # compile
  jax.block_until_ready(metrics)
  rates = []
  for window in range(5):
    indices = datasets.batch_indices(config.seed, (window + 1) * steps_per_call, steps_per_call,
                                 batch_size, len(train_split))
    start = time.perf_counter()
    state, metrics = run(state, images, labels, indices)
    jax.block_until_ready(metrics)
    rates.append(steps_per_call * batch_size / (time.perf_counter() - start))
  images_per_sec = statistics.median(rates)
  return {"batch_size": batch_size, "microbatch_size": config.microbatch_size,
          "images_per_sec": images_per_sec,
          "flops_per_image": flops_per_image, "executed_flops_per_image": executed,
          "gflops_per_sec": images_per_sec * flops_per_image / 1e9 if count_flops else None}


def flops_per_image_of(config, info, mesh, model, tx, state, batch) -> tuple[float, float]:
  """(The model's FLOPs per image, those its compiled train step executes) on `batch`.
  The model's are those of its plain form (lax.conv, every conv output computed): the
  fast CPU form skips outputs the 2x2 pool drops, which must not count as work done."""
  from research import models
  from research.run import train

  executed = train_step_flops(model, tx, state, *batch) / len(batch[1])
  if "conv_impl" not in models.MODELS[config.model.name].knobs:
    return executed, executed
  reference = config.copy_and_resolve_references()
  reference.model.conv_impl = "xla"
  plain_model, _, _, _ = train.build_model_and_state(reference, info, mesh)
  return train_step_flops(plain_model, tx, state, *batch) / len(batch[1]), executed


def train_step_flops(model, tx, state, images, labels) -> float:
  """XLA's FLOP count of one train step on this batch, compiled whole: its cost
  analysis counts a scan body once, so no micro-batch split here."""
  import jax

  from research import backend
  from research.run import steps

  step = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx))
  options = backend.current().analysis_compile_options
  cost = step.lower(state, images, labels).compile(options).cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def microbatch_overrides(batch_size: int, platform: str | None = None) -> dict:
  """On CPU, batches above MICROBATCH run as micro-batches of that size (--microbatch=0:
  never); accelerators measure the batch as given (research/backend.py decides).
  `platform`: the measured machine's, else this process's JAX backend."""
  from research import backend

  size = backend.current(platform).benchmark_microbatch(batch_size, MICROBATCH.value)
  return {"microbatch_size": size} if size else {}


def machine(measure_peak: bool = True) -> dict:
  """Devices of this process's JAX backend and, on CPU, the measured fp32 matmul peak
  (None without `measure_peak`: for callers that report no fraction of it)."""
  import jax

  platform = jax.default_backend()
  return {"devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
          "platform": platform, "device_kind": jax.devices()[0].device_kind,
          "matmul_peak_gflops": (matmul_peak_gflops() if platform == "cpu" and measure_peak
                                 else None)}


def in_child(what: str, *args) -> dict:
  """Runs one measurement (`machine` or `throughput`) in a child process."""
  command = [sys.executable, "-m", "research.benchmark", f"--microbatch={MICROBATCH.value}",
             f"--throughput_images={THROUGHPUT_IMAGES.value}",
             "--measure=" + json.dumps({"what": what, "args": args})]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
  if result.returncode != 0 or not lines:
    raise RuntimeError(f"{what}{args} failed:\n{result.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def peak_for(results: dict, recipe: str) -> tuple[float | None, str]:
  """The peak a recipe's rate is compared with (see PEAKS)."""
  found = results["machine"]
  if found["platform"] == "cpu":
    return found["matmul_peak_gflops"], "measured fp32 matmul peak"
  dtype = RECIPES[recipe][1].get("model.dtype", "float32")
  return device_peak_gflops(found["device_kind"], dtype)


def main(argv):
  del argv
  if _MEASURE.value:  # a child: one measurement
    request = json.loads(_MEASURE.value)
    measure = {"machine": machine, "throughput": throughput}[request["what"]]
    print("RESULT " + json.dumps(measure(*request["args"])), flush=True)
    return
  os.makedirs(OUT_DIR.value, exist_ok=True)
  results = {"machine": in_child("machine"), "recipes": {}}
  for name in _RECIPES.value:
    config_file, overrides = RECIPES[name]
    if name == "resnet20":
      overrides = {**overrides, "model.width": _WIDTH.value}
    run_overrides = command_line.override_flags(overrides)
    if name == "resnet20":
      run_overrides.append(f"--config.num_epochs={_EPOCHS.value}")
    rows = [in_child("throughput", config_file, {**overrides, **microbatch_overrides(int(b), results["machine"]["platform"])},
                     int(b)) for b in BATCH_SIZES.value]
    results["recipes"][name] = {"throughput": rows, "training": training_run(config_file,
                                                                             run_overrides),
                                "peak": peak_for(results, name), "overrides": overrides}
    print(f"{name}: done", file=sys.stderr, flush=True)
  table = markdown(results)
  print(table)
  with open(os.path.join(OUT_DIR.value, "bench.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(OUT_DIR.value, "bench.json"), "w") as f:
    json.dump(results, f, indent=2)


def markdown(results: dict) -> str:
  found = results["machine"]
  if found.get("platform", "cpu") == "cpu":
    where = (f"{found['cpu_count']} CPU cores, {', '.join(found['devices'])}; measured fp32 "
             f"matmul peak {found['matmul_peak_gflops']:.0f} GFLOP/s.")
  else:
    where = (f"{len(found['devices'])} x {found['device_kind']} ({found['platform']}); % of "
             "peak: of one device's datasheet peak for the recipe's arithmetic (bf16, or TF32 "
             "for float32).")
  lines = [f"Machine: {where}", ""]
  header = ("| recipe | first epoch s (compile incl.) | steady epoch s | test acc | peak RSS MB "
            "| MFLOP/image, model (executed) | batch (micro) | images/s | GFLOP/s | % of peak |")
  lines += [header, "|" + "---|" * 10]
  for name, recipe in results["recipes"].items():
    run = recipe["training"]
    peak, _ = recipe.get("peak") or (found["matmul_peak_gflops"], "")
    for i, row in enumerate(recipe["throughput"]):
      lead = (f"| {name} | {run['first_epoch_seconds']:.1f} | "
              f"{_fmt(run['median_epoch_seconds'])} | {_fmt(run['test_accuracy'], 4)} | "
              f"{run['peak_rss_mb']:.0f} | {row['flops_per_image'] / 1e6:.1f} "
              f"({row['executed_flops_per_image'] / 1e6:.1f}) "
              if i == 0 else "| | | | | | ")
      split = 0 < row["microbatch_size"] < row["batch_size"]
      micro = f" ({row['microbatch_size']})" if split else ""
      digits = 2 if peak and peak > 1e4 else 0  # small recipes use a sliver of a GPU's peak
      fraction = f"{100 * row['gflops_per_sec'] / peak:.{digits}f}%" if peak else "n/a"
      lines.append(f"{lead}| {row['batch_size']}{micro} | {row['images_per_sec']:.0f} | "
                   f"{row['gflops_per_sec']:.1f} | {fraction} |")
  peaks = {recipe.get("peak", (None, ""))[1] for recipe in results["recipes"].values()}
  if found.get("platform", "cpu") != "cpu" and peaks:
    lines += ["", "Peaks used: " + "; ".join(sorted(p for p in peaks if p)) + " (research/"
              "benchmark.py PEAKS)."]
  return "\n".join(lines)


def _fmt(value, digits: int = 1) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
  app.run(main)
