"""The package layout (research/__init__.py): every folder's module map names exactly its
files, and imports only point down the floors the top-level map lists."""

import ast
import os
import re

import pytest

RESEARCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research")
# Bottom to top: a folder may import the ground floor and the folders before it.
FLOORS = ["models", "data", "run", "config", "tools", "studies"]
# On the ground floor, but they call into every folder: the command line and what it runs.
ENTRY_POINTS = ["main", "program"]
COMMANDS = ["bench_compare", "bench_input", "benchmark", "check_accelerator", "command_line",
            "predict", "prepare_data", "report"]


def _listed(folder: str) -> set[str]:
  with open(os.path.join(RESEARCH, folder, "__init__.py")) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  return set(re.findall(r"(?<![/\w`])\w+\.py\b", doc)) | set(re.findall(r"^ +(\w+/) ", doc, re.M))


def _files(folder: str) -> set[str]:
  here = os.path.join(RESEARCH, folder)
  names = {f for f in os.listdir(here) if f.endswith(".py") and f != "__init__.py"}
  return names | {f + "/" for f in os.listdir(here) if f != "__pycache__" and
                  os.path.isfile(os.path.join(here, f, "__init__.py"))}


@pytest.mark.parametrize("folder", ["", *FLOORS])
def test_module_map_names_every_file(folder):
  listed, files = _listed(folder), _files(folder)
  assert files - listed == set(), f"research/{folder} files missing from its map"
  assert listed - files == set(), f"research/{folder} map names files that do not exist"


def test_floors_are_the_folders():
  assert {f[:-1] for f in _files("") if f.endswith("/")} == {*FLOORS, "peers"}


def _imported_floors(path: str) -> set[str]:
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("research"):
      parts = node.module.split(".")
      found |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("research.")}
  return found


def _modules():
  for folder in ["", *FLOORS]:
    here = os.path.join(RESEARCH, folder)
    for name in sorted(os.listdir(here)):
      if name.endswith(".py"):
        yield folder, name[:-3], os.path.join(here, name)


@pytest.mark.parametrize("folder,name,path", list(_modules()),
                         ids=lambda v: v if isinstance(v, str) and "/" not in v else None)
def test_imports_point_down(folder, name, path):
  if not folder and name in (*ENTRY_POINTS, *COMMANDS):
    return  # the entry points and the command aliases sit above everything
  allowed = set(FLOORS[:FLOORS.index(folder)]) if folder else set()
  upward = {m for m in _imported_floors(path) if m in FLOORS and m != folder} - allowed
  assert not upward, f"research/{folder}/{name}.py imports {sorted(upward)}, above its floor"


def test_commands_run_their_module():
  for name in COMMANDS:
    with open(os.path.join(RESEARCH, f"{name}.py")) as f:
      text = f.read()
    target = re.search(r'run_module\("research\.(\w+)\.(\w+)"', text)
    assert target, name
    assert os.path.isfile(os.path.join(RESEARCH, target[1], target[2] + ".py")), name
