"""A dataset that is not prepared and cannot be fetched: one line naming the dataset, why,
and the ways forward; exit status 2; nothing half-written in the TFDS data folder.

The network is really cut (no mock of TFDS): the command runs in a network namespace of
its own where `unshare -rn` works, else with HTTP(S) proxies pointing at a closed port.
"""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SMOKE = "--config=configs/default.py:smoke"
KMNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
WAYS = ("Ways forward: (1) run `python -m research.prepare_data --dataset=kmnist` on a machine "
        "with a network and copy the prepared", "(2) set TFDS_DATA_DIR",
        "(3) download http://codh.rois.ac.jp/kmnist/dataset/kmnist/t10k-images-idx3-ubyte.gz,")


def _namespace_works() -> bool:
  return bool(shutil.which("unshare")) and subprocess.run(
      ["unshare", "-rn", "true"], capture_output=True).returncode == 0


def _offline(command: list[str], data_dir, namespace: bool):
  """`command` with the network cut: a network namespace, or proxies at a closed port."""
  env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
  env["TFDS_DATA_DIR"] = str(data_dir)
  if namespace:
    command = ["unshare", "-rn", *command]
  else:
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _one_line(result) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_training_on_a_dataset_that_cannot_be_fetched(tmp_path):
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  result = _offline([sys.executable, "-m", "research.main", SMOKE, f"--workdir={workdir}",
                     "--config.dataset.name=kmnist"], data_dir, namespace=False)
  line = _one_line(result)
  assert line.startswith("error: Dataset kmnist cannot be fetched here: no network (the proxy "
                         "127.0.0.1:9 cannot be reached: Connection refused)."), line
  for way in WAYS:
    assert way in line, line
  assert f"into {data_dir}/downloads/manual (TFDS's manual download" in line
  assert not workdir.exists() and not data_dir.exists()


@pytest.mark.slow
def test_a_checksum_mismatch_keeps_the_users_files_and_removes_the_rest(tmp_path):
  data_dir = tmp_path / "tfds"
  manual = data_dir / "downloads" / "manual"
  manual.mkdir(parents=True)
  for name in KMNIST_FILES:  # downloaded by hand, but not the files TFDS registered
    (manual / name).write_bytes(b"not the dataset\n")
  result = _offline([sys.executable, "-m", "research.prepare_data", "--dataset=kmnist"],
                    data_dir, namespace=_namespace_works())
  line = _one_line(result)
  assert line.startswith("error: Dataset kmnist cannot be fetched here: a checksum mismatch ("
                         "Artifact http://codh.rois.ac.jp/kmnist/"), line
  for way in WAYS:
    assert way in line, line
  left = sorted(str(path.relative_to(data_dir)) for path in data_dir.rglob("*"))
  assert left == ["downloads", "downloads/manual",
                  *(f"downloads/manual/{name}" for name in sorted(KMNIST_FILES))]


def test_a_dataset_that_needs_a_manual_download():
  from research.data import prepare_data
  from research.errors import UserError

  with pytest.raises(UserError) as error:
    prepare_data.ensure_prepared("imagenet2012", data_dir="/nonexistent/tfds", allow_apt=False)
  message = str(error.value)
  assert message.startswith("Dataset imagenet2012 cannot be fetched here: a manual download is "
                            "needed (manual_dir should contain two files: "
                            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar."), message
  assert "(3) download http://www.image-net.org/" in message and "\n" not in message
  assert not os.path.exists("/nonexistent/tfds")
