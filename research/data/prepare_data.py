"""Makes sure a TFDS dataset is prepared, offline sources first.

Order of attempts for `ensure_prepared(name)`:
  1. the dataset is already prepared in the TFDS data dir -> use it as is;
  2. a local copy of the original source files exists (Debian's
     `dataset-fashion-mnist` for fashion_mnist; installed with apt-get when
     missing and we are root) -> TFDS prepares from it via `manual_dir`, checking
     TFDS's registered checksums;
  3. the dataset's download hosts (or proxy) answer -> TFDS's normal download;
  4. otherwise a `UserError` that says how to get the data: one line naming the
     dataset, why it cannot be fetched (no network, a manual download needed, a
     checksum mismatch) and three ways forward; what a failed download wrote in the
     TFDS data folder is removed.

Run as `python -m research.prepare_data --dataset=fashion_mnist` (`make data`);
`--source_dir=DIR` prepares from a folder of the original files instead (no network).
"""

import contextlib
import dataclasses
import gzip
import importlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import zlib
from typing import Mapping

from absl import app, flags, logging

from research.errors import UserError

OFFLINE_ENV = "RESEARCH_OFFLINE"  # set to 1 to never try a network download


@dataclasses.dataclass(frozen=True)
class LocalSource:
  """Original source files of a dataset as shipped by a Debian package."""

  debian_package: str
  directory: str
  # File name -> modification time stored in the original gzip header. Debian
  # rewrote the headers (name dropped, mtime changed); putting the original
  # header back yields byte-identical originals, which TFDS then checksums.
  gzip_mtimes: Mapping[str, int]
  download_host: str


LOCAL_SOURCES = {
    "fashion_mnist": LocalSource(
        debian_package="dataset-fashion-mnist",
        directory="/usr/share/datasets/fashion-mnist",
        gzip_mtimes={
            "train-images-idx3-ubyte.gz": 0x59A7E9DE,
            "train-labels-idx1-ubyte.gz": 0x59A7E9DE,
            "t10k-images-idx3-ubyte.gz": 0x59A7E9F3,
            "t10k-labels-idx1-ubyte.gz": 0x59A7E9F3,
        },
        download_host="fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    ),
}


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


# The TFDS module defining each dataset the configs name. Without it imported first,
# tfds.builder finds a dataset defined the older way by importing every dataset module TFDS
# has: about 0.27 CPU-s, in every run. Other names take that path.
_TFDS_MODULES = {
    "fashion_mnist": "image_classification.mnist", "mnist": "image_classification.mnist",
    "kmnist": "image_classification.mnist", "cifar10": "image_classification.cifar",
    "cifar100": "image_classification.cifar",
}


def builder_for(name: str, data_dir: str | None):
  """Returns the TFDS builder, or a UserError naming the known datasets."""
  import tensorflow_datasets as tfds

  module = _TFDS_MODULES.get(name.split("/")[0].split(":")[0])
  if module:
    with contextlib.suppress(ImportError):  # moved in another TFDS: the slow path finds it
      importlib.import_module(f"tensorflow_datasets.{module}")
  data_dir = data_dir or default_data_dir()
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(
        f"dataset.name={name!r} is not a TFDS dataset. Use a name from "
        "`tfds.list_builders()`, e.g. fashion_mnist, mnist, cifar10.") from e
  except Exception as e:  # a malformed name or a damaged prepared copy, from deep in TFDS
    detail = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
    if type(e).__name__ == "ParseError" or "dataset_info" in str(e):
      raise UserError(
          f"The prepared copy of {name} in {data_dir} is damaged: its dataset_info.json cannot "
          f"be read ({detail}). Delete {os.path.join(data_dir, name.split('/')[0])} and run "
          "`make data` to prepare it again.") from e
    raise UserError(f"dataset.name={name!r} cannot be used: {type(e).__name__}: {detail} "
                    "Accepted: NAME[/CONFIG][:VERSION] of a TFDS dataset, e.g. fashion_mnist.") from e


def is_prepared(builder) -> bool:
  return (builder.data_path / "dataset_info.json").exists()


def ensure_prepared(name: str, data_dir: str | None = None, allow_apt: bool = True,
                    source_dir: str | None = None):
  """Returns a builder whose dataset is prepared (see module docstring). `source_dir`: a
  folder holding the dataset's original files, instead of the Debian package's."""
  data_dir = data_dir or default_data_dir()
  builder = builder_for(name, data_dir)
  if is_prepared(builder):
    return builder
  _clear_unfinished(builder)
  logging.info("Dataset %s is not prepared in %s.", name, builder.data_dir)
  hide_gpus_from_tensorflow()  # TFDS prepares with TensorFlow
  source = LOCAL_SOURCES.get(name)
  if source_dir:
    if source is None:
      raise UserError(f"--source_dir is known for {', '.join(LOCAL_SOURCES)} only, not {name}.")
    source = dataclasses.replace(source, directory=source_dir)
    missing = [f for f in source.gzip_mtimes if not os.path.exists(os.path.join(source_dir, f))]
    if missing:
      raise UserError(f"{source_dir} lacks {', '.join(missing)}: give a folder holding the "
                      f"original files {', '.join(source.gzip_mtimes)}.")
  if source and not _has_local_files(source) and allow_apt:
    _apt_install(source.debian_package)
  if source and _has_local_files(source):
    _prepare_from_local_files(builder, source, data_dir)
  elif _download_allowed(source):
    _download(builder, name, data_dir)
  else:
    raise UserError(_missing_data_message(name, builder, source))
  return builder


def hide_gpus_from_tensorflow() -> None:
  """TensorFlow (imported by TFDS only while preparing data) must leave the GPUs to JAX:
  it would otherwise claim their memory. As the Flax examples do, before it starts."""
  try:
    import tensorflow as tf
  except ImportError:
    return
  tf.config.set_visible_devices([], "GPU")


def _has_local_files(source: LocalSource) -> bool:
  return all(os.path.exists(os.path.join(source.directory, f)) for f in source.gzip_mtimes)


def _apt_install(package: str) -> None:
  if os.geteuid() != 0 or not shutil.which("apt-get"):
    return
  logging.info("Installing Debian package %s for its dataset files.", package)
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
      logging.warning("%s failed: %s", " ".join(command), result.stderr.strip()[-500:])
      return


def _download_allowed(source: LocalSource | None) -> bool:
  """TFDS retries an unreachable host for minutes; ask the host once first."""
  if os.environ.get(OFFLINE_ENV) == "1":
    return False
  if source is None:  # host unknown here: let TFDS try
    return True
  try:
    socket.create_connection((source.download_host, 80), timeout=5).close()
    return True
  except OSError:
    return False


def _download(builder, name: str, data_dir: str) -> None:
  """TFDS's download and preparation, or one line saying why the dataset cannot be fetched
  (no network, a manual download needed, a checksum mismatch) and the ways forward; what
  the attempt wrote in the data folder is removed."""
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

  manual_dir = os.path.join(data_dir, "downloads", "manual")
  instructions = " ".join((builder.MANUAL_DOWNLOAD_INSTRUCTIONS or "").split())
  if instructions and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
    raise UserError(_fetch_failure(name, builder, data_dir, manual_dir,
                                   f"a manual download is needed ({instructions[:300]})"))
  unreachable = _unreachable(builder, manual_dir)  # TFDS would retry for minutes
  if unreachable:
    raise UserError(_fetch_failure(name, builder, data_dir, manual_dir,
                                   f"no network ({unreachable})"))
  logging.info("Downloading %s with TFDS.", name)
  before = _written_by_tfds(data_dir, name)
  try:
    builder.download_and_prepare()
  except BaseException as e:
    _remove_new(data_dir, name, before)
    if isinstance(e, NonMatchingChecksumError):
      why = f"a checksum mismatch ({_first_line(e)})"
    elif isinstance(e, AssertionError) and "Manual directory" in str(e):
      why = f"a manual download is needed ({_first_line(e)} {' '.join(str(e).split()[-40:])})"
    elif _is_network_error(e):
      why = f"no network ({_first_line(e)})"
    else:
      raise
    raise UserError(_fetch_failure(name, builder, data_dir, manual_dir, why)) from None


def _first_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return (text[:300] + "...") if len(text) > 300 else text or type(error).__name__


def _is_network_error(error: BaseException) -> bool:
  import requests

  return isinstance(error, (requests.exceptions.RequestException, ConnectionError, socket.error))


def _unreachable(builder, manual_dir: str) -> str:
  """'' when every host (or proxy) the dataset downloads from answers, else which does not.
  Files already in TFDS's manual folder need no download."""
  import urllib.parse
  import urllib.request

  try:
    urls = [url for url, info in (builder.url_infos or {}).items()
            if not (info.filename and os.path.exists(os.path.join(manual_dir, info.filename)))]
  except Exception:  # noqa: BLE001 -- a dataset without registered checksums: TFDS decides
    return ""
  proxies = urllib.request.getproxies()
  for address in sorted({(u.scheme, u.hostname, u.port) for u in map(urllib.parse.urlsplit, urls)
                         if u.hostname}):
    scheme, host, port = address
    proxy = proxies.get(scheme) if not urllib.request.proxy_bypass(host) else None
    target = (urllib.parse.urlsplit(proxy) if proxy else None)
    host, port = ((target.hostname, target.port or 80) if target else
                  (host, port or {"https": 443, "ftp": 21}.get(scheme, 80)))
    try:
      socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
      through = f"the proxy {host}:{port}" if target else f"{host}:{port}"
      return f"{through} cannot be reached: {e.strerror or e}"
  return ""


def _written_by_tfds(data_dir: str, name: str) -> set[str]:
  """The paths a download of `name` may add to the data folder, as they are now."""
  found = set()
  for top in (name.split("/")[0].split(":")[0], "downloads"):
    for folder, dirs, files in os.walk(os.path.join(data_dir, top)):
      found.add(folder)
      found.update(os.path.join(folder, entry) for entry in dirs + files)
  return found


def _remove_new(data_dir: str, name: str, before: set[str]) -> None:
  """Removes what a failed download added (partial downloads, an unfinished dataset folder);
  what was there before stays."""
  for path in sorted(_written_by_tfds(data_dir, name) - before, key=len):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.remove(path)


def _fetch_failure(name: str, builder, data_dir: str, manual_dir: str, why: str) -> str:
  try:
    urls = sorted(builder.url_infos or {})
  except Exception:  # noqa: BLE001 -- no registered downloads
    urls = []
  listed = (", ".join(urls) if 0 < len(urls) <= 6 else
            f"the {len(urls)} files TFDS lists for {name}" if urls else "its files")
  return (f"Dataset {name} cannot be fetched here: {why}. Ways forward: (1) run `python -m "
          f"research.prepare_data --dataset={name}` on a machine with a network and copy the "
          f"prepared {os.path.join(data_dir, name.split('/')[0].split(':')[0])} folder to the "
          f"same place here; (2) set TFDS_DATA_DIR (or --config.dataset.data_dir) to a shared "
          f"folder that holds a prepared copy; (3) download {listed} by hand into {manual_dir} "
          "(TFDS's manual download, checked against its checksums) and run the command again.")


def restore_original_gzip(src: str, dst: str, mtime: int) -> None:
  """Writes `src` with the gzip header the original file had (FNAME + mtime)."""
  with open(src, "rb") as f:
    data = f.read()
  if data[:3] != b"\x1f\x8b\x08":
    raise UserError(f"{src} is not a gzip file. Reinstall it: apt-get install --reinstall "
                    "dataset-fashion-mnist")
  flags_byte = data[3]
  if flags_byte & 0x08:  # already carries a file name: keep the file as it is
    body_with_header = data
  elif flags_byte == 0:
    name = os.path.basename(src)[:-len(".gz")].encode()
    header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03" + name + b"\x00"
    body_with_header = header + data[10:]
  else:
    body_with_header = data
  with open(dst, "wb") as f:
    f.write(body_with_header)


def _clear_unfinished(builder) -> None:
  """TFDS treats an existing version folder as prepared; an empty one is a leftover."""
  path = builder.data_path
  if not path.exists():
    return
  if any(path.iterdir()):
    raise UserError(f"{path} exists but holds no prepared dataset (no dataset_info.json): an "
                    "interrupted or damaged preparation. Delete that folder and run `make data`.")
  path.rmdir()


def _prepare_from_local_files(builder, source: LocalSource, data_dir: str) -> None:
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

  logging.info("Preparing %s from %s.", builder.name, source.directory)
  with tempfile.TemporaryDirectory(prefix="manual-", dir=_writable_dir(data_dir)) as manual:
    for file_name, mtime in source.gzip_mtimes.items():
      src = os.path.join(source.directory, file_name)
      _check_gzip_stream(src)
      restore_original_gzip(src, os.path.join(manual, file_name), mtime)
    config = tfds.download.DownloadConfig(manual_dir=manual)
    try:
      builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as e:
      named = [os.path.join(source.directory, name) for name in source.gzip_mtimes
               if name in str(e)] or [f"a file in {source.directory}"]
      raise UserError(
          f"{', '.join(named)} does not match the checksum TFDS registered for {builder.name}: "
          f"the file is damaged or from another release. Run `apt-get install --reinstall "
          f"{source.debian_package}`.") from e


def _check_gzip_stream(path: str) -> None:
  """Names the damaged file before TFDS reports a checksum somewhere deep inside."""
  try:
    with gzip.open(path, "rb") as f:
      while f.read(1 << 22):
        pass
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise UserError(f"{path} is corrupt or truncated ({e}). Reinstall it: "
                    "apt-get install --reinstall dataset-fashion-mnist") from e


def _writable_dir(data_dir) -> str:
  path = os.fspath(data_dir)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f"Cannot create the TFDS data dir {path}: {e}. Set TFDS_DATA_DIR or "
                    "--config.dataset.data_dir to a writable folder.") from e
  return path


def _missing_data_message(name, builder, source) -> str:
  ways = [f"- put an already prepared copy in {builder.data_dir} (TFDS layout), or set "
          "TFDS_DATA_DIR / --config.dataset.data_dir to where one is;"]
  if source:
    ways.append(f"- install the original files: `sudo apt-get install {source.debian_package}` "
                f"(they land in {source.directory}), then run `make data`;")
  ways.append(f"- on a machine with internet: `python -m research.prepare_data --dataset={name}` "
              "downloads and prepares it with TFDS.")
  return f"Dataset {name} is not available offline and cannot be downloaded here.\n" + "\n".join(ways)


_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "TFDS dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or "
                                "~/tensorflow_datasets).")
_SOURCE_DIR = flags.DEFINE_string("source_dir", None, "A folder of the dataset's original files "
                                  "(Fashion-MNIST: the four .gz files), instead of Debian's.")


def main(argv):
  del argv
  try:
    builder = ensure_prepared(_DATASET.value, _DATA_DIR.value, source_dir=_SOURCE_DIR.value)
  except UserError as e:
    e.exit()
  print(f"{builder.name} is prepared in {builder.data_path}")


if __name__ == "__main__":
  app.run(main)
