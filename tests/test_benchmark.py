"""The benchmark's measurements on the real seed recipe (numbers are only printed by
`make bench`; here: that they are measured at all, and counted the right way)."""

from absl import flags
import pytest

from research.tools import benchmark


@pytest.mark.cpu_only
@pytest.mark.slow
def test_throughput_counts_the_models_flops_not_the_fast_forms(fashion_mnist):
  del fashion_mnist  # prepared data
  # Benchmark flags at their defaults but 2 timed steps a window (64 images, not 4,096):
  # the counts are tested here, not the speed.
  flags.FLAGS(["test", "--throughput_images=64"])
  row = benchmark.throughput("configs/default.py", {}, batch_size=32)
  assert row["images_per_sec"] > 0
  # The fast CPU form skips the conv outputs the 2x2 pools drop (an 11x11 map pooled to
  # 5x5 needs only 10x10); the model's count, from its lax.conv form, includes them.
  assert 14e6 < row["flops_per_image"] < 17e6  # the hand count: ~15 MFLOP
  assert row["executed_flops_per_image"] < row["flops_per_image"]
  assert row["gflops_per_sec"] == row["images_per_sec"] * row["flops_per_image"] / 1e9
  results = {"machine": {"cpu_count": 2, "devices": ["cpu:0"], "matmul_peak_gflops": 300.0},
             "recipes": {"seed": {"throughput": [row], "training": {
                 "first_epoch_seconds": 7.5, "median_epoch_seconds": 6.5,
                 "test_accuracy": 0.91, "peak_rss_mb": 800}}}}
  table = benchmark.markdown(results)
  assert f"| seed | 7.5 | 6.5 | 0.9100 | 800 | {row['flops_per_image'] / 1e6:.1f} (" in table


@pytest.mark.cpu_only
def test_a_step_compiled_for_its_flops_only_counts_as_the_full_compile(fashion_mnist):
  """train_step_flops compiles with Backend.analysis_compile_options (LLVM's cheapest code,
  never run): XLA's cost analysis is that of the default compile, key for key."""
  import functools

  import jax

  from research import backend, mesh as mesh_lib
  from research.run import steps, train

  info, train_split, _ = fashion_mnist
  config = benchmark.load_config("configs/default.py", {"batch_size": 8})
  model, tx, init_fn, _ = train.build_model_and_state(config, info, mesh_lib.make_mesh())
  step = jax.jit(functools.partial(steps.train_step, apply_fn=model.apply, tx=tx))
  lowered = step.lower(init_fn(0), train_split.images[:8], train_split.labels[:8])
  options = backend.current().analysis_compile_options
  assert options  # on the CPU: cheaper than the defaults
  full = lowered.compile().cost_analysis()
  assert lowered.compile(options).cost_analysis() == full
  assert (full[0] if isinstance(full, list) else full)["flops"] > 1e6


def test_side_by_side_table_gives_every_peer_to_ours_ratio_and_its_median():
  from research.tools import bench_compare

  def result(seconds):
    return {"steady_epoch_s": seconds, "first_epoch_s": seconds + 1, "test_accuracy": 0.9,
            "peak_rss_mb": 700}

  rounds = [{"ours (JAX)": result(5.0), "ours (JAX, bf16)": result(4.0),
             "Keras/TF": result(10.0), "PyTorch": result(12.0)},
            {"ours (JAX)": result(6.0), "ours (JAX, bf16)": result(4.0),
             "Keras/TF": result(9.0), "PyTorch": result(12.0)},
            {"ours (JAX)": result(5.0), "ours (JAX, bf16)": result(5.0),
             "Keras/TF": result(11.0), "PyTorch": result(10.0)}]
  report = {"rounds": rounds, "epochs": 3, "cpu_count": 2, "date": "2026-11-24", "microbatch": 64,
            "throughput": {name: {32: 1000.0} for name in rounds[0]}}
  table = bench_compare.markdown(report)
  assert ("| Keras/TF ÷ ours (JAX) | PyTorch ÷ ours (JAX) | Keras/TF ÷ ours (JAX, bf16) | "
          "PyTorch ÷ ours (JAX, bf16) |") in table
  assert "| 2 | 6.00 | 4.00 | 9.00 | 12.00 | 1.50x | 2.00x | 2.25x | 3.00x |" in table
  # Medians of the per-round ratios: (2.0, 1.5, 2.2), (2.4, 2.0, 2.0), (2.5, 2.25, 2.2), (3, 3, 2).
  assert "| **median** | **5.00** | **4.00** | **10.00** | **12.00** | **2.00x** | **2.00x** | " \
         "**2.25x** | **3.00x** |" in table


def test_accelerator_peaks_name_the_recipes_arithmetic():
  peak = benchmark.device_peak_gflops
  assert peak("NVIDIA H100 80GB HBM3", "bfloat16") == (989_400.0, "H100 bf16 peak")
  assert peak("NVIDIA H100 80GB HBM3", "float32") == (494_700.0, "H100 TF32 peak")
  assert peak("NVIDIA H100 PCIe", "float32")[0] == 378_000.0
  assert peak("NVIDIA H200", "bfloat16")[0] == peak("NVIDIA H100 80GB HBM3", "bfloat16")[0]
  assert peak("NVIDIA A100-SXM4-80GB", "float32")[0] == 156_000.0
  assert peak("NVIDIA L4", "bfloat16")[0] == 121_000.0
  # A TPU runs float32 matmuls as bfloat16 passes: its float32 recipes use the bf16 peak.
  assert peak("TPU v5 lite", "float32") == (197_000.0, "TPU v5 lite bf16 peak")
  assert peak("TPU v4", "bfloat16")[0] == 275_000.0 and peak("TPU v6 lite", "bfloat16")[0] == 918e3
  assert peak("TPU v5", "bfloat16")[0] == 459_000.0
  assert peak("Tesla T4", "float32")[0] is None
  row = {"batch_size": 256, "microbatch_size": 0, "images_per_sec": 400_000.0,
         "flops_per_image": 15e6, "executed_flops_per_image": 15e6, "gflops_per_sec": 6000.0}
  results = {"machine": {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
                         "devices": ["cuda:0"], "cpu_count": 16, "matmul_peak_gflops": None},
             "recipes": {"seed_bf16": {"throughput": [row], "peak": (989_400.0, "H100 bf16 peak"),
                                       "training": {"first_epoch_seconds": 2.0,
                                                    "median_epoch_seconds": 0.4,
                                                    "test_accuracy": 0.91, "peak_rss_mb": 900}}}}
  table = benchmark.markdown(results)
  assert "1 x NVIDIA H100 80GB HBM3 (gpu)" in table and "| 400000 | 6000.0 | 0.61% |" in table
  assert "Peaks used: H100 bf16 peak" in table


@pytest.mark.slow
def test_bench_parent_leaves_every_device_to_its_children(tmp_path):
  # The parent measures nothing itself: with no recipe it only asks a child for the
  # machine, and never imports JAX (which would open the GPU or TPU).
  import subprocess
  import sys

  script = ("import sys\nfrom absl import flags\nfrom research.tools import benchmark\n"
            f"flags.FLAGS(['bench', '--recipes=', '--out={tmp_path}'])\nbenchmark.main([])\n"
            "assert 'jax' not in sys.modules, 'the parent imported jax'\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=benchmark.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "measured fp32 matmul peak" in (tmp_path / "bench.md").read_text()
