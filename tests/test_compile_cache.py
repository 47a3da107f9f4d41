"""The persistent compilation cache (research/run/compile_cache.py): where it is, that a second
run loads what the first compiled, that two runs can fill it at once, and that a damaged or
unwritable cache costs a warning, never the run."""

import glob
import os
import subprocess
import sys

import jax
import pytest
from conftest import REPO

from research.run import compile_cache

# One step and the evaluation: the run's three big programs (init, train loop, eval), of
# the MLP: what is tested is the cache, and these runs compile (three of the four from an
# empty or damaged cache), which takes the CNN several times as long.
RUN = ["--config=configs/default.py:smoke,model=mlp", "--config.num_train_steps=1",
       "--config.log_every_steps=1", "--config.dataset.eval_split=test[:1000]"]


def test_the_folder_comes_from_the_config_then_jax_variable_then_the_users_cache():
  assert compile_cache.folder("off") is None
  assert compile_cache.folder("/data/cache", {"JAX_COMPILATION_CACHE_DIR": "/x"}) == "/data/cache"
  assert compile_cache.folder("auto", {"JAX_COMPILATION_CACHE_DIR": "/x"}) == "/x"
  assert compile_cache.folder("auto", {"XDG_CACHE_HOME": "/c"}) == "/c/research/jax"
  home = os.path.expanduser("~")
  assert compile_cache.folder("auto", {}) == os.path.join(home, ".cache", "research", "jax")


def test_an_unwritable_cache_is_a_warning_and_the_run_compiles_without_it(tmp_path, caplog):
  (tmp_path / "file").write_text("not a folder")
  try:
    assert compile_cache.set_up(str(tmp_path / "file" / "cache")) is None
    assert not jax.config.jax_enable_compilation_cache
    assert jax.jit(lambda x: x + 1)(1) == 2  # compiles, without a cache
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
  assert "cannot be used" in caplog.text and "--config.compile_cache=off" in caplog.text


def test_an_entry_without_its_access_time_does_not_stop_later_writes(tmp_path):
  """As JAX leaves an entry without a size limit (tests compiling in-process, a user's
  notebook on the same folder) or a run killed between an entry's two files: JAX 0.10
  with the runs' limit would fail every later write of the folder."""
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "jit_other-0123-cache").write_bytes(b"a program")
  program = ("import sys, jax; from research.run import compile_cache; "
             "compile_cache.set_up(sys.argv[1]); "
             "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
             "print(jax.jit(lambda x: x * 3)(2))")
  result = subprocess.run([sys.executable, "-c", program, str(cache)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0 and result.stdout.strip() == "6", result.stderr[-3000:]
  assert "Error writing persistent compilation cache" not in result.stderr
  assert (cache / "jit_other-0123-atime").exists()
  assert glob.glob(str(cache / "jit__lambda*-cache"))  # the new program was written


def _start(workdir, cache):
  return subprocess.Popen(
      [sys.executable, "-m", "research.main", f"--workdir={workdir}", *RUN,
       f"--config.compile_cache={cache}"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _finish(process) -> str:
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  return stderr


def _entries(cache) -> dict:
  """{entry file: bytes of its access-time file}, which JAX rewrites on every read."""
  return {path: open(path[:-len("cache")] + "atime", "rb").read()
          for path in glob.glob(os.path.join(cache, "*-cache"))}


@pytest.mark.slow
def test_runs_fill_the_cache_together_load_it_and_survive_damaged_entries(tmp_path):
  cache = tmp_path / "cache"
  # Two runs write the empty cache at once (JAX locks each entry: no torn files).
  for stderr in map(_finish, [_start(tmp_path / name, cache) for name in ("a", "b")]):
    assert "Error reading persistent compilation cache" not in stderr
  written = _entries(cache)
  names = {os.path.basename(path).split("-")[0] for path in written}
  assert {"jit_create_state", "jit_train_many", "jit_evaluate_all"} <= names
  # A third, identical run reads every program and compiles none of them again.
  stderr = _finish(_start(tmp_path / "c", cache))
  read = _entries(cache)
  assert read.keys() == written.keys()
  assert all(read[path] != written[path] for path in written)
  # Damaged entries (cut in half): JAX warns and compiles; the run ends the same.
  for path in written:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  damaged = _finish(_start(tmp_path / "d", cache))
  assert "Error reading persistent compilation cache entry" in damaged
  fingerprint = lambda text: text.strip().splitlines()[-1].split("params ")[-1]
  assert fingerprint(damaged) == fingerprint(stderr)
