"""Every study command docs/studies.md and README.md show runs, in the form shown, at smoke
size: workdirs under a temporary folder, `...` filled with a small grid, USER@DBHOST with the
test's own PostgreSQL server, /shared/ with a temporary folder, a stand-in `sbatch`, and
each trainer cut to 10 steps. The first command (the grid) runs as `python -m launch.sweep`,
with a trial and the chosen trial's test evaluation; the others, whose point is their space,
search, storage, launcher, split, workers or plan, go through every check and set their study
up (storage, enqueued trials, results) but start no trial (`--timeout` of a microsecond): a
trial per command took 80-130 s each on the 2 shared cores, for the same training. They run
through the command's own flag parser and `main` in this process (test_sweep.run_in_process):
a process each cost 3-4 CPU-seconds of imports and set-up, which the first command shows."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from test_study import bare_postgres_url, postgres_url  # noqa: F401 -- a real PostgreSQL server
from test_sweep import run_in_process

# ml_collections loads config files with the deprecated load_module, once per in-process parse.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
DOTS = ["--config=configs/default.py", "--workdir=runs/dots", "--sweep=seed=0,1"]
TRAINER = ["--config.num_train_steps=10", "--config.eval_every_steps=10",
           "--config.log_every_steps=10", "--config.eval_batch_size=1000"]
SPACE_FILE = "optimizer.learning_rate=loguniform(1e-4,3e-2)  # a range\nbatch_size=choice(32,64)\n"


def _commands(path: str, start: str = "", end: str = "") -> list[str]:
  """The `python -m launch.sweep` lines of the bash blocks of `path` (between `start`/`end`)."""
  text = open(os.path.join(REPO, path)).read()
  text = text[text.index(start) if start else 0:text.index(end) if end else len(text)]
  found = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      if line.strip().startswith("python -m launch.sweep"):
        found.append(line.strip())
  return found


def documented() -> list[str]:
  commands = _commands("docs/studies.md") + _commands("README.md", "**Studies.**",
                                                      "**Predictions.**")
  unique = []
  for command in commands:
    key = re.sub(r"postgresql://USER@\w+/\w+", "postgresql://DB", command.split("#")[0].strip())
    if key not in [re.sub(r"postgresql://USER@\w+/\w+", "postgresql://DB", c.split("#")[0].strip())
                   for c in unique]:
      unique.append(command)
  return unique


def _smoke(command: str, tmp_path, database: str, sbatch_dir, train: bool):
  """The command as a test runs it: the same flags, smoke-sized, on the test's servers."""
  args = shlex.split(command, comments=True)[3:]  # after `python -m launch.sweep`
  args = [part for arg in args for part in (DOTS if arg == "..." else [arg])]
  shared = tmp_path / "shared" / "studies"
  shared.mkdir(parents=True, exist_ok=True)
  (tmp_path / "space.txt").write_text(SPACE_FILE)
  replaced = []
  for arg in args:
    arg = arg.replace("runs/", f"{tmp_path}/runs/").replace("/shared/", f"{tmp_path}/shared/")
    arg = re.sub(r"postgresql://USER@\w+/\w+", database, arg)
    arg = arg.replace("--storage=...", f"--storage={database}")
    arg = arg.replace("--space_file=space.txt", f"--space_file={tmp_path / 'space.txt'}")
    replaced.append(arg)
  own, trials = (replaced[:replaced.index("--")], replaced[replaced.index("--") + 1:]) if (
      "--" in replaced) else (replaced, [])
  own.append("--timeout=1" if train else "--timeout=1e-6")  # one trial, or none
  env = {**os.environ, "PATH": f"{sbatch_dir}:{os.environ['PATH']}"}
  return [sys.executable, "-m", "launch.sweep", *own, "--", *trials, *TRAINER], env


@pytest.fixture(scope="module")
def sbatch_dir(tmp_path_factory):
  """A stand-in `sbatch` that accepts the array job (the array tasks are test_sweep.py's)."""
  folder = tmp_path_factory.mktemp("bin")
  (folder / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 4242\n")
  (folder / "sbatch").chmod(0o755)
  return folder


def test_the_docs_show_every_kind_of_study_command():
  commands = documented()
  flags_shown = " ".join(commands)
  for flag in ("--sweep=", "--space=", "--space_file=", "--workers=2", "--storage=postgresql://",
               "--storage=/shared/", "--launcher=slurm", "--select_split=", "--dry_run",
               "--sampler_seed=0", "--pruner=hyperband"):
    assert flag in flags_shown, flag
  assert len(commands) >= 10, commands


@pytest.mark.slow
@pytest.mark.parametrize("command", documented())
def test_a_documented_study_command_runs(command, tmp_path, bare_postgres_url,  # noqa: F811
                                         sbatch_dir, monkeypatch, capsys):
  train = command == documented()[0]
  argv, env = _smoke(command, tmp_path, bare_postgres_url, sbatch_dir, train=train)
  if train:  # the real program, end to end
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    status, stdout, stderr = result.returncode, result.stdout, result.stderr
  else:
    monkeypatch.setenv("PATH", env["PATH"])  # the stand-in sbatch
    status, stdout, stderr = run_in_process(argv[3:], monkeypatch, capsys)
  output = stdout + stderr
  if "--select_split=validation" in command:
    # Fashion-MNIST has no validation split: refused before anything, naming it.
    assert status == 2, output[-3000:]
    assert "--select_split='validation': Split 'validation' of fashion_mnist" in output
    return
  assert status == 0, (argv, output[-3000:])
  assert "Traceback" not in output
  if "--dry_run" in command:
    assert "Each trial: python -m research.main" in stdout
  elif "--launcher=slurm" in command:
    assert "Submitted 8 workers: Submitted batch job 4242" in stdout
  else:
    workdir = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--workdir="))
    assert os.path.exists(os.path.join(workdir, "results.md")), output[-3000:]
    if "--timeout=1e-6" not in argv:  # a trial ran and was chosen
      assert "-> " in stdout and "Chosen: trial" in open(
          os.path.join(workdir, "results.md")).read(), output[-3000:]
