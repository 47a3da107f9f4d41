"""The documentation's code runs as written: the checkpoint recipe of
docs/checkpoint_format.md and the quick tour of README.md."""

import os
import re
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
