"""`make` checks what it needs from the machine before creating anything."""

import os
import subprocess

import pytest

from conftest import REPO


def _fake_python(tmp_path, files: dict) -> str:
  """A `python3` that runs the real one with `files` first on its path."""
  shadow = tmp_path / "shadow"
  for name, text in files.items():
    (shadow / name).parent.mkdir(parents=True, exist_ok=True)
    (shadow / name).write_text(text)
  wrapper = tmp_path / "python3"
  wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={shadow} exec python3 "$@"\n')
  wrapper.chmod(0o755)
  return str(wrapper)


@pytest.mark.parametrize("files, expected", [
    # Debian and Ubuntu ship ensurepip apart, in python3-venv / python3.X-venv.
    ({"ensurepip/__init__.py": "raise ImportError('No module named ensurepip')"},
     ["cannot create virtual environments", "apt-get install python3-venv", "-venv)"]),
    ({"sitecustomize.py": "import sys\nsys.version_info = (3, 10, 12, 'final', 0)\n"},
     ["Python 3.11+ is needed", "is Python 3.10", "make PYTHON=python3.11"]),
])
def test_make_names_the_missing_prerequisite_and_creates_nothing(tmp_path, files, expected):
  venv = tmp_path / "venv"
  result = subprocess.run(
      ["make", "-C", REPO, f"PYTHON={_fake_python(tmp_path, files)}", f"VENV={venv}",
       f"{venv}/.installed-cpu"], capture_output=True, text=True, timeout=60)
  assert result.returncode != 0
  for fragment in expected:
    assert fragment in result.stderr, result.stderr
  assert "Traceback" not in result.stderr
  assert not venv.exists()


def test_a_python_that_is_not_there_is_named(tmp_path):
  venv = tmp_path / "venv"
  result = subprocess.run(["make", "-C", REPO, "PYTHON=python3.99", f"VENV={venv}",
                           f"{venv}/.installed-cpu"], capture_output=True, text=True, timeout=60)
  assert result.returncode != 0
  assert "python3.99 not found" in result.stderr
  assert not venv.exists()


def test_the_license_is_the_apache_license_that_pyproject_names():
  with open(os.path.join(REPO, "LICENSE")) as f:
    assert "Apache License\n                           Version 2.0" in f.read()
  with open(os.path.join(REPO, "pyproject.toml")) as f:
    assert 'license = "Apache-2.0"' in f.read()
