"""Console lines read as messages, in a terminal and when piped (SLURM, `| tee`); absl's
full lines stay available with --verbose and in the --log_dir files."""

import glob
import os
import pty
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_main

RUN = ["--config=configs/default.py:smoke", "--config.num_train_steps=20",
       "--config.log_every_steps=10", "--config.eval_every_steps=20"]
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
SHORT = re.compile(r"^\d\d:\d\d:\d\d (WARNING: |ERROR: )?\S")


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
  """A short run whose stderr is a pipe, with absl's log files in log_dir."""
  root = tmp_path_factory.mktemp("console")
  log_dir = root / "logs"
  log_dir.mkdir()
  result = run_main(str(root / "run"), *RUN, f"--log_dir={log_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return root / "run", log_dir, result.stderr


def _our_lines(text: str) -> list[str]:
  keys = ("Training cnn", "step 10/20", "test[:1000] loss", "Finished 20 steps", "Resumed from",
          "already finished")
  return [line for line in text.splitlines() if any(key in line for key in keys)]


@pytest.mark.slow
def test_piped_console_lines_start_with_the_time_and_the_message(piped_run):
  _, _, stderr = piped_run
  lines = _our_lines(stderr)
  assert len(lines) == 4, stderr[-3000:]  # start, step 10 (20 is the test line's), test, end
  for line in lines:
    assert SHORT.match(line) and not ABSL_PREFIX.match(line), line
  assert not any(ABSL_PREFIX.match(line) for line in stderr.splitlines()), stderr[-3000:]


@pytest.mark.slow
def test_log_dir_files_keep_absls_full_lines(piped_run):
  _, log_dir, _ = piped_run
  [log_file] = [p for p in glob.glob(str(log_dir / "*.INFO.*")) if not os.path.islink(p)]
  text = open(log_file).read()
  lines = _our_lines(text)
  assert len(lines) == 4, text[-3000:]
  for line in lines:
    assert ABSL_PREFIX.match(line), line
  assert re.search(r"run_log\.py:\d+\] Training cnn", text)


@pytest.mark.slow
def test_verbose_shows_absls_full_lines(piped_run):
  workdir, _, _ = piped_run
  result = run_main(str(workdir), *RUN, "--verbose")
  assert result.returncode == 0, result.stderr[-3000:]
  [line] = [line for line in result.stderr.splitlines() if "already finished" in line]
  assert ABSL_PREFIX.match(line), line


@pytest.mark.slow
def test_terminal_lines_between_the_bars_are_short_too(piped_run):
  workdir, _, _ = piped_run
  leader, follower = pty.openpty()
  command = [sys.executable, "-m", "research.main", f"--workdir={workdir}", *RUN[:1],
             "--config.num_train_steps=30", *RUN[2:], "--allow_config_change"]
  process = subprocess.Popen(command, cwd=REPO, stdin=follower, stdout=follower,
                             stderr=follower, env={**os.environ, "COLUMNS": "200"})
  os.close(follower)
  output = b""
  while True:
    try:
      chunk = os.read(leader, 65536)
    except OSError:  # EIO: the process closed the terminal
      break
    if not chunk:
      break
    output += chunk
  os.close(leader)
  assert process.wait(timeout=300) == 0, output[-3000:]
  text = output.decode(errors="replace").replace("\r", "\n")
  assert "%|" in text  # a progress bar was drawn
  lines = [line for line in text.splitlines()
           if any(key in line for key in ("Resumed from", "Training cnn", "test[:1000] loss",
                                          "Finished 30 steps"))]
  assert len(lines) == 4, text[-3000:]
  for line in lines:
    assert SHORT.match(line) and not ABSL_PREFIX.match(line), line
