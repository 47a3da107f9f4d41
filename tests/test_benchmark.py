"""The benchmark's measurements on the real seed recipe (numbers are only printed by
`make bench`; here: that they are measured at all, and counted the right way)."""

from absl import flags

from research import benchmark


def test_throughput_counts_the_models_flops_not_the_fast_forms(fashion_mnist):
  del fashion_mnist  # prepared data
  flags.FLAGS(["test"])  # benchmark flags at their defaults
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
