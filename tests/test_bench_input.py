"""`make bench-input` (research/tools/bench_input.py) at smoke size: photographs prepared through
TFDS's array_record path, and every run of the table measured and printed."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO


def _documented_command() -> list[str]:
  """The command docs/input.md shows (what `make bench-input` runs)."""
  with open(os.path.join(REPO, "docs", "input.md")) as f:
    block = re.search(r"```bash\n(.*?)```", f.read(), re.S).group(1)
  with open(os.path.join(REPO, "Makefile")) as f:
    assert "-m research.bench_input $(BENCH_ARGS)" in f.read()
  return shlex.split(block.strip())


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
  """One --photos_dir for the file's runs: the first prepares the 24 photographs through
  TFDS, the others find them prepared (the builder's version names the count)."""
  return tmp_path_factory.mktemp("bench_input")


@pytest.mark.slow
def test_bench_input_prints_every_run_side_by_side(photos_dir):
  command = _documented_command()
  assert command[:3] == ["python", "-m", "research.bench_input"]
  result = subprocess.run(
      [sys.executable, *command[1:], f"--photos_dir={photos_dir}",
       "--examples=24", "--batch_size=8", "--steps=2", "--ceiling_batch=32"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "Photographs: 24 of 500x375, JPEG quality 90" in out and "load average" in out

  def figures(run):
    """The numbers after a row's label (one for the decode rows, three for the others)."""
    line = next(line for line in out.splitlines() if line.startswith(run))
    return [float(value) for value in line.split("(1 core)")[-1].split()[-3:]]

  # One core decoding, per CPU-second: the old and new paths and the candidate decoders.
  for run in ("decode, old:", "decode, new:", "decode, OpenCV: decode_box",
              "decode, OpenCV: whole decode", "decode, OpenCV: decode alone",
              "decode, PIL: draft decode", "decode, PIL: whole decode",
              "decode, PIL: decode alone", "decode, TF: decode_and_crop_jpeg + resize, eager",
              "decode, TF: decode_and_crop_jpeg + resize, tf.function",
              "decode, TF: decode_and_crop_jpeg alone"):
    rate, = figures(run)
    assert rate > 0
  # Pipelines and the ceiling: wall img/s, per core used, per CPU-second of every process.
  for run in ("threads (old", "workers=1 (", "workers=2 (",
              "ceiling (main thread, batch 32; hand-off, no transfer)",
              "ceiling through 2 worker processes' shared memory (batch 32)",
              "ceiling with a copy into device memory (batch 32)",
              "ceiling, only taken from grain (batch 32)"):
    rate, per_core, per_cpu_second = figures(run)
    assert rate > 0 and per_core > 0 and per_cpu_second > 0
  assert "workers 1 -> 2:" in out
  # Written through TFDS: the array_record files and their metadata.
  prepared = os.path.join(photos_dir, "bench_photos", "1.0.24")
  assert any(name.endswith("array_record-00000-of-00001") for name in os.listdir(prepared))


@pytest.mark.slow
@pytest.mark.parametrize("runs,rows", [("workers=1,workers=2", ("workers=1", "workers=2")),
                                       ("workers=1", ("workers=1",)), ("decode", ("decode,",))])
def test_the_runs_docs_input_quotes_print_only_those_rows(photos_dir, runs, rows):
  """`python -m research.bench_input --runs=...` in the forms docs/input.md quotes."""
  with open(os.path.join(REPO, "docs", "input.md")) as f:
    assert f"research.bench_input --runs={runs}`" in f.read().replace("\n", " ")
  result = subprocess.run(
      [sys.executable, "-m", "research.bench_input", f"--runs={runs}",
       f"--photos_dir={photos_dir}", "--examples=24", "--batch_size=8", "--steps=2"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  printed = [line.split()[0] for line in result.stdout.splitlines()
             if line.startswith(("decode", "threads", "workers=", "ceiling"))]
  assert printed and all(name.startswith(rows) for name in printed), printed
  assert set(rows) <= {name for name in printed} | {"decode,"}
  if runs == "workers=1,workers=2":
    assert "workers 1 -> 2:" in result.stdout
  assert "leaked shared_memory" not in result.stderr, result.stderr[-3000:]
