"""The documentation's code runs as written: the checkpoint recipe of
docs/checkpoint_format.md and the quick tour of README.md."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO


def _python_blocks(path) -> list[str]:
  with open(os.path.join(REPO, path)) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.slow
def test_the_checkpoint_recipe_reads_rebuilds_and_evaluates_a_run(trained_workdir, tmp_path):
  blocks = _python_blocks("docs/checkpoint_format.md")
  assert len(blocks) == 4 and 'WORKDIR = pathlib.Path("runs/default")' in blocks[0]
  blocks[0] = blocks[0].replace('"runs/default"', repr(trained_workdir))
  zoo = next(i for i, block in enumerate(blocks) if "from research import" in block)
  # Reading and evaluating need no `research`: it is unimportable until the zoo's block.
  code = "\n".join(["import sys\nsys.modules['research'] = None", *blocks[:zoo],
                    "del sys.modules['research']", *blocks[zoo:]])
  (tmp_path / "recipe.py").write_text(code)
  result = subprocess.run([sys.executable, "recipe.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r"step 300: test accuracy 0\.\d{4}", result.stdout), result.stdout
  assert "agrees with the plain-Flax model on 1.0 of 1000" in result.stdout, result.stdout


SMOKE_SIZE = ["--config.num_train_steps=20", "--config.log_every_steps=10",
              "--config.eval_every_steps=20", "--config.dataset.eval_split=test[:1000]"]


def _quick_tour_commands() -> list[list[str]]:
  """The commands of the README's quick tour, as written there."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  tour = text[text.index("\n## Quick tour\n"):]
  block = re.search(r"```bash\n(.*?)```", tour, re.S).group(1)
  lines = [line for line in block.replace("\\\n", " ").splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
  return [shlex.split(line) for line in lines]


@pytest.mark.slow
def test_the_readmes_quick_tour_runs_at_smoke_size(tmp_path):
  commands = _quick_tour_commands()
  assert len(commands) >= 5 and all(c[:2] == ["python", "-m"] for c in commands), commands
  assert any("--mode=eval" in c for c in commands)
  for command in commands:
    # Workdirs under runs/ go to a temporary folder; training runs shrink to 20 steps and
    # evaluations of 1,000 test images.
    command = [sys.executable, *[arg.replace("runs/", f"{tmp_path}/runs/") for arg in command[1:]]]
    if command[2] == "research.main" and "--mode=eval" not in command:
      command += SMOKE_SIZE
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (command, result.stderr[-3000:])
  assert os.path.exists(tmp_path / "runs/default/report/report.md")
  assert os.path.exists(tmp_path / "runs/default/eval.jsonl")
