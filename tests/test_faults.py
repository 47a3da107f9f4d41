"""Faults with real files, processes and signals: damaged data, a busy or stale workdir,
a read-only workdir, a disk that fills during a checkpoint, SIGKILL during a save.

Nothing here touches the real prepared dataset: damaged copies are hard-linked
trees whose damaged files are replaced, never modified in place.
"""

import dataclasses
import errno
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, run_here, run_main, tree_digest
from research.data import prepare_data
from research.errors import UserError
from research.run import workdir_layout, workdir_lock

SMOKE = "--config=configs/default.py:smoke"
LONG = [SMOKE, "--config.num_train_steps=1000000"]  # runs until a signal stops it


def _error(result, status=2):
  assert result.returncode == status, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return result.stderr[result.stderr.index("error: "):]


# ---- Data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared_dir(fashion_mnist):
  """The real prepared Fashion-MNIST version folder (prepared by the fixture if needed)."""
  builder = prepare_data.builder_for("fashion_mnist", None)
  return os.fspath(builder.data_path)


def _damaged_copy(prepared, root, damage):
  """A TFDS data dir at `root` whose fashion_mnist files are hard links to the real
  ones, except the file `damage(version_dir)` replaces."""
  version_dir = os.path.join(root, "fashion_mnist", os.path.basename(prepared))
  shutil.copytree(prepared, version_dir, copy_function=os.link)
  damage(version_dir)
  return root


def _replace(path, content: bytes):
  os.remove(path)  # break the hard link first: the real file stays intact
  with open(path, "wb") as f:
    f.write(content)


def _shard(version_dir, split="train"):
  return os.path.join(version_dir, f"fashion_mnist-{split}.array_record-00000-of-00001")


def _read(path):
  with open(path, "rb") as f:
    return f.read()


DAMAGES = {
    "truncated shard": (lambda d: _replace(_shard(d), _read(_shard(d))[:1_000_000]),
                        ["Cannot read split 'train'", "fashion_mnist-train.array_record",
                         "delete that folder"]),
    "missing shard": (lambda d: os.remove(_shard(d)),
                      ["Cannot read split 'train'", "No such file", "make data"]),
    "garbage shard": (lambda d: _replace(_shard(d), os.urandom(70_000)),
                      ["Cannot read split 'train'", "delete that folder"]),
    "corrupt dataset_info.json": (
        lambda d: _replace(os.path.join(d, "dataset_info.json"), b'{"name": "fashion'),
        ["prepared copy of fashion_mnist", "is damaged", "dataset_info.json", "make data"]),
    "missing dataset_info.json": (lambda d: os.remove(os.path.join(d, "dataset_info.json")),
                                  ["holds no prepared dataset", "make data"]),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.slow
def test_damaged_prepared_dataset_is_a_clear_error_not_a_hang(prepared_dir, tmp_path, damage):
  make_damage, fragments = DAMAGES[damage]
  data_dir = _damaged_copy(prepared_dir, str(tmp_path / "tfds"), make_damage)
  before = tree_digest(prepared_dir)
  workdir = str(tmp_path / "run")
  result = run_main(workdir, SMOKE, f"--config.dataset.data_dir={data_dir}", timeout=120,
                    env={"RESEARCH_OFFLINE": "1"})
  message = _error(result)
  for fragment in fragments:
    assert fragment in message, message
  assert not os.path.exists(workdir)
  assert tree_digest(prepared_dir) == before


def _local_source_copy(tmp_path, victim, content_of):
  """A LocalSource whose files are copies of Debian's, `victim` rewritten by content_of."""
  source = prepare_data.LOCAL_SOURCES["fashion_mnist"]
  if not prepare_data._has_local_files(source):
    pytest.skip(f"{source.directory} is not installed")
  directory = tmp_path / "source"
  directory.mkdir()
  for name in source.gzip_mtimes:
    shutil.copy(os.path.join(source.directory, name), directory)
  path = directory / victim
  path.write_bytes(content_of(path.read_bytes()))
  return dataclasses.replace(source, directory=str(directory)), str(path)


def _flip_middle_byte(data: bytes) -> bytes:
  damaged = bytearray(data)
  damaged[len(damaged) // 2] ^= 0xFF
  return bytes(damaged)


def _same_gzip_other_content(data: bytes) -> bytes:
  """A valid gzip stream (Debian's header layout) whose content differs by one label."""
  raw = bytearray(gzip.decompress(data))
  raw[100] = (raw[100] + 1) % 10
  stream = bytearray(gzip.compress(bytes(raw), mtime=0))
  stream[9] = 3  # OS byte as in Debian's files
  return bytes(stream)


@pytest.mark.parametrize("content_of, fragment", [
    (lambda data: data[:len(data) // 2], "is corrupt or truncated"),
    (_flip_middle_byte, "is corrupt or truncated (CRC check failed"),
    (lambda data: b"", "is not a gzip file"),
    (_same_gzip_other_content, "does not match the checksum TFDS registered"),
])
def test_damaged_source_file_is_named(tmp_path, content_of, fragment):
  victim = "t10k-labels-idx1-ubyte.gz"
  source, path = _local_source_copy(tmp_path, victim, content_of)
  data_dir = str(tmp_path / "tfds")
  builder = prepare_data.builder_for("fashion_mnist", data_dir)
  with pytest.raises(UserError) as error:
    prepare_data._prepare_from_local_files(builder, source, data_dir)
  assert path in str(error.value) and fragment in str(error.value)
  assert "apt-get install --reinstall dataset-fashion-mnist" in str(error.value)
  assert not prepare_data.is_prepared(builder)


# ---- Workdir: a second run, a stale lock, a read-only folder -------------------------------

class _Run:
  """A `research.main` process whose stderr is collected as it comes."""

  def __init__(self, workdir, *flags):
    command = [sys.executable, "-m", "research.main", f"--workdir={workdir}", *flags]
    self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr),
                                    daemon=True)
    self._reader.start()

  def wait_for(self, text, timeout=180):
    deadline = time.time() + timeout
    while not any(text in line for line in self.lines):
      assert self.process.poll() is None or self._reader.is_alive(), "".join(self.lines)[-3000:]
      assert time.time() < deadline, f"no {text!r} in: " + "".join(self.lines)[-3000:]
      time.sleep(0.05)

  def finish(self, timeout=120) -> str:
    self.process.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return "".join(self.lines)


@pytest.mark.slow
def test_second_run_refused_while_live_then_stale_lock_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  first = _Run(workdir, *LONG)
  try:
    first.wait_for("Training cnn")  # it holds the lock from before this line
    owner = _lock_owner(workdir)
    assert owner["pid"] == first.process.pid and owner["host"] == socket.gethostname()

    second = run_here(workdir, *LONG)
    message = _error(second)
    assert (f"in use by a live run (pid {first.process.pid} on host {socket.gethostname()}"
            in message)
    assert first.process.poll() is None  # the live run goes on
  finally:
    first.process.kill()  # SIGKILL: no clean-up, the lock file stays behind
    first.finish()
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))

  third = _Run(workdir, *LONG)
  try:
    third.wait_for("Training cnn")
    third.process.send_signal(signal.SIGTERM)  # preemption: checkpoint, exit, release the lock
    stderr = third.finish()
  finally:
    third.process.kill()
  assert third.process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert f"Taking over the stale lock of a run that is gone (pid {first.process.pid}" in stderr
  assert "Preempted (SIGTERM)" in stderr
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def _lock_owner(workdir) -> dict:
  try:
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):  # absent, or being rewritten
    return {}


def test_lock_in_process_refuses_a_holder_and_takes_over_a_dead_one(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  with workdir_lock.WorkdirLock(workdir):
    with pytest.raises(UserError, match=f"in use by a live run \\(pid {os.getpid()}"):
      with workdir_lock.WorkdirLock(workdir):
        pass
  assert not os.path.exists(workdir)  # released, and the empty folder it made is gone

  # A lock file nobody holds (its process died), written by another machine.
  os.makedirs(workdir)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump({"pid": 123456, "host": "other-host", "started": "yesterday", "command": "x"}, f)
  with workdir_lock.WorkdirLock(workdir):
    pass
  assert "stale lock" in caplog.text and "pid 123456 on host other-host" in caplog.text
  assert os.listdir(workdir) == []


def test_refused_run_leaves_no_workdir_behind(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError):
    with workdir_lock.WorkdirLock(workdir):
      raise RuntimeError("a check failed")
  assert not os.path.exists(workdir)


@pytest.fixture
def small_tmpfs(tmp_path):
  """mount(size, read_only) -> a folder on a tmpfs of that size, unmounted afterwards;
  skips where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
  mounted = []

  def mount(size: str, read_only: bool = False):
    target = tmp_path / f"tmpfs{len(mounted)}"
    target.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                            capture_output=True, text=True)
    if result.returncode != 0:
      pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    mounted.append(target)
    return target

  yield mount
  for target in mounted:
    subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.slow
def test_workdir_not_writable(tmp_path, small_tmpfs):
  if os.geteuid() == 0:
    parent = small_tmpfs("1m", read_only=True)  # root ignores permissions, not a ro mount
    reason = "Read-only file system"
  else:
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    reason = "Permission denied"
  workdir = str(parent / "run")
  message = _error(run_here(workdir, SMOKE))
  assert f"--workdir={workdir} cannot be written: {reason}" in message


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, small_tmpfs):
  # A checkpoint of the seed CNN takes ~1.4 MB: the first fits in 2 MB, the second cannot.
  workdir = str(small_tmpfs("2m") / "run")
  flags = [SMOKE, "--config.num_train_steps=100", "--config.checkpoint_every_steps=50"]
  result = run_main(workdir, *flags)
  assert result.returncode == 1, result.stderr[-3000:]
  # TensorStore may print an "Event loop is closed" traceback of Orbax's cancelled background
  # writes (from C++, past any Python hook); our message comes last, with no frame of ours.
  frames = [line for line in result.stderr.splitlines() if line.startswith('  File "')]
  assert not any("/research/" in frame for frame in frames), result.stderr[-3000:]
  message = result.stderr[result.stderr.index("error: "):]
  assert message.strip().count("\n") == 0
  assert "Writing checkpoint step 100" in message and "the disk is full" in message
  assert "The previous checkpoint (step 50) is untouched" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["50"]  # no half-written one
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))

  # With space again (a copy elsewhere), the same command resumes from step 50 and finishes.
  roomy = str(tmp_path / "roomy")
  shutil.copytree(workdir, roomy)
  resumed = run_here(roomy, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from checkpoint step 50" in resumed.stderr


def test_failed_checkpoint_write_message_when_a_tmpfs_cannot_be_mounted(tmp_path):
  """The same failure, simulated (a patched wait raising ENOSPC) for machines where
  the tmpfs test above is skipped."""
  import jax.numpy as jnp

  from research.run import checkpoint, steps

  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  state = steps.TrainState(step=jnp.int32(5), params={"w": jnp.ones((4,))}, model_state={},
                           opt_state={}, rng=jnp.zeros((2,), jnp.uint32))
  ckpt.save(state, {})
  ckpt.wait()

  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  ckpt.manager.save = disk_full  # the write of step 10 "fails"
  with pytest.raises(UserError) as error:
    ckpt.save(state.replace(step=jnp.int32(10)), {})
  ckpt.close()
  assert error.value.exit_code == 1
  assert "Writing checkpoint step 10" in str(error.value)
  assert "the disk is full" in str(error.value) and "(step 5) is untouched" in str(error.value)
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).steps() == [5]


# ---- Checkpoints are never written in place ------------------------------------------------

WRITER = """
import sys
import jax.numpy as jnp
from research.run import checkpoint, steps

ckpt = checkpoint.Checkpointer(sys.argv[1], keep=2)
for step in range(1, 100000):
  state = steps.TrainState(step=jnp.int32(step), params={"w": jnp.full((8_000_000,), float(step))},
                           model_state={}, opt_state={}, rng=jnp.zeros((2,), jnp.uint32))
  ckpt.save(state, {"step": step})
  ckpt.wait()
"""


def test_sigkill_during_a_save_leaves_each_step_complete_or_absent(tmp_path):
  import jax
  import jax.numpy as jnp

  from research.run import checkpoint, steps

  workdir = str(tmp_path / "run")
  directory = os.path.join(workdir, "checkpoints")
  writer = subprocess.Popen([sys.executable, "-c", WRITER, workdir], cwd=REPO,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": REPO})
  deadline = time.time() + 120
  try:
    # Kill during the third save or later: some steps are complete, one is half-written.
    while True:
      assert writer.poll() is None and time.time() < deadline
      entries = os.listdir(directory) if os.path.isdir(directory) else []
      finished = [e for e in entries if e.isdigit()]
      if finished and max(map(int, finished)) >= 2 and any("tmp" in e for e in entries):
        writer.send_signal(signal.SIGKILL)
        break
      time.sleep(0.002)
  finally:
    writer.kill()
    writer.wait()

  entries = os.listdir(directory)
  assert any("tmp" in e for e in entries), entries  # the save it interrupted
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  listed = ckpt.steps()
  assert listed and all(str(step) in entries for step in listed)
  abstract = jax.eval_shape(lambda: steps.TrainState(
      step=jnp.int32(0), params={"w": jnp.zeros((8_000_000,))}, model_state={}, opt_state={},
      rng=jnp.zeros((2,), jnp.uint32)))
  for step in listed:  # every listed step reads back whole
    state, meta = ckpt.restore(abstract, step)
    assert int(state.step) == step and meta == {"step": step}
    assert np.all(np.asarray(state.params["w"]) == step)
  ckpt.close()


# ---- Workdir paths of the wrong kind: one line, exit 2, nothing written or lost --------------

TINY_RUN = ["--config.num_train_steps=2", "--config.log_every_steps=1",
            "--config.eval_every_steps=2", "--config.dataset.eval_split=test[:100]",
            "--config.eval_batch_size=100"]


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
  """A finished 2-step run (config.json, run.json, metrics.jsonl, tensorboard/, checkpoints/)."""
  from research.config import command_line, config_validation
  from research.run import train

  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  config = command_line.parse_config(TINY_RUN, "configs/default.py:smoke")
  train.train_and_evaluate(config_validation.validate(config), workdir)
  return workdir


def _wrong_kind(workdir, name):
  """Puts the wrong kind of thing at WORKDIR/name; what was there is kept beside it."""
  from research.run import workdir_layout

  path = os.path.join(workdir, name)
  if os.path.lexists(path):
    os.rename(path, path + ".kept")
  if workdir_layout.ENTRIES[name][0] == workdir_layout.FOLDER:
    with open(path, "w") as f:
      f.write("not a folder\n")
    return "is a file, but a run keeps a folder there"
  os.makedirs(os.path.join(path, "inside"))
  return "is a folder, but a run keeps a file there"


@pytest.mark.parametrize("name", sorted(workdir_layout.ENTRIES))
@pytest.mark.slow
def test_each_workdir_path_of_the_wrong_kind_is_refused_in_train_and_eval(finished_workdir,
                                                                         tmp_path, name):
  from research import program
  from research.config import command_line, config_validation
  from research.run import train

  workdir = str(tmp_path / "run")
  shutil.copytree(finished_workdir, workdir, symlinks=True)
  fragment = _wrong_kind(workdir, name)
  before = tree_digest(workdir)
  config = command_line.parse_config(TINY_RUN, "configs/default.py:smoke")
  with pytest.raises(UserError) as training:
    train.train_and_evaluate(config_validation.validate(config), workdir)
  with pytest.raises(UserError) as evaluation:
    program.train_or_evaluate(workdir, config, mode="eval")
  for error in (training, evaluation):
    assert f"{os.path.join(workdir, name)} {fragment}" in str(error.value)
    assert "nothing was changed" in str(error.value)
  assert tree_digest(workdir) == before
  assert sorted(os.listdir(workdir)) == sorted(set(os.listdir(finished_workdir)) | {name}
                                               | ({f"{name}.kept"} if os.path.lexists(
                                                   os.path.join(finished_workdir, name)) else set()))


@pytest.mark.slow
def test_a_broken_link_in_the_workdir_is_named(finished_workdir, tmp_path):
  from research.config import command_line, config_validation
  from research.run import train

  workdir = str(tmp_path / "run")
  shutil.copytree(finished_workdir, workdir)
  os.symlink(str(tmp_path / "gone"), os.path.join(workdir, "tensorboard.new"))
  os.rename(os.path.join(workdir, "tensorboard"), os.path.join(workdir, "tensorboard.kept"))
  os.rename(os.path.join(workdir, "tensorboard.new"), os.path.join(workdir, "tensorboard"))
  with pytest.raises(UserError, match="tensorboard is a broken link"):
    train.train_and_evaluate(config_validation.validate(
        command_line.parse_config(TINY_RUN, "configs/default.py:smoke")), workdir)


@pytest.mark.parametrize("setup, fragment", [
    (lambda w: (shutil.rmtree(os.path.join(w, "checkpoints")),
                open(os.path.join(w, "checkpoints"), "w").close()),
     "checkpoints is a file, but a run keeps a folder there (the run's checkpoints)"),
    (lambda w: os.mkdir(os.path.join(w, "metrics.jsonl.new")) or os.replace(
        os.path.join(w, "metrics.jsonl"), os.path.join(w, "metrics.jsonl.kept")) or os.rename(
        os.path.join(w, "metrics.jsonl.new"), os.path.join(w, "metrics.jsonl")),
     "metrics.jsonl is a folder, but a run keeps a file there"),
])
@pytest.mark.slow
def test_wrong_kind_from_the_command_line_is_one_line_and_exit_2(finished_workdir, tmp_path,
                                                                 setup, fragment):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_workdir, workdir)
  setup(workdir)
  before = tree_digest(workdir)
  result = run_main(workdir, SMOKE, *TINY_RUN, timeout=120)
  message = _error(result)
  assert message.strip().count("\n") == 0 and fragment in message, message
  assert tree_digest(workdir) == before


@pytest.mark.slow
def test_a_workdir_that_is_a_file_says_so(tmp_path):
  existing = tmp_path / "notes.txt"
  existing.write_text("my notes\n")
  message = _error(run_here(str(existing), SMOKE))
  assert f"--workdir={existing} is a file, not a folder" in message
  below = _error(run_here(str(existing / "run"), SMOKE))
  assert f"cannot be created: {existing} is a file, not a folder" in below
  assert existing.read_text() == "my notes\n"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="simulates a user without access by dropping root's DAC override")
@pytest.mark.parametrize("target, mode, fragment", [
    ("checkpoints", 0o000, "checkpoints cannot be read: Permission denied"),
    ("", 0o555, "cannot be written: Permission denied"),
])
@pytest.mark.slow
def test_a_folder_without_permission_is_one_line(finished_workdir, tmp_path, target, mode,
                                                 fragment):
  # Tests run as root, whom permission bits do not stop; without CAP_DAC_OVERRIDE and
  # CAP_DAC_READ_SEARCH (dropped by setpriv for the program only) they stop root too.
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_workdir, workdir)
  before = tree_digest(workdir)
  os.chmod(os.path.join(workdir, target), mode)
  try:
    command = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
               "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
               "research.main", f"--workdir={workdir}", SMOKE, *TINY_RUN]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  finally:
    os.chmod(os.path.join(workdir, target), 0o755)
  message = _error(result)
  assert message.strip().count("\n") == 0 and fragment in message, message
  assert tree_digest(workdir) == before


# ---- An error while reporting an error still ends the program, with one line -------------

VANISHING_FOLDER = """
import os, shutil, sys
import jax.numpy as jnp
from research.errors import UserError
from research.run import checkpoint, steps

ckpt = checkpoint.Checkpointer(sys.argv[1])
state = steps.TrainState(step=jnp.int32(1), params={"w": jnp.ones((4,))}, model_state={},
                         opt_state={}, rng=jnp.zeros((2,), jnp.uint32))
ckpt.save(state, {})
ckpt.wait()
shutil.rmtree(ckpt.directory)  # the checkpoints folder replaced by a file mid-run
open(ckpt.directory, "w").close()
try:
  ckpt.save(state.replace(step=jnp.int32(2)), {})
  ckpt.wait()
except UserError as e:  # as research.main ends
  e.exit()
"""


@pytest.mark.slow
def test_a_failed_write_whose_handler_meets_another_failure_ends_promptly(tmp_path):
  # Before: the handler raised NotADirectoryError listing the folder, and Orbax's threads,
  # still waiting for the write, kept the process alive until it was killed.
  started = time.time()
  result = subprocess.run([sys.executable, "-c", VANISHING_FOLDER, str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": REPO})
  assert time.time() - started < 60
  assert result.returncode == 1, result.stderr[-3000:]
  # Orbax logs its background thread's traceback (research.main shows it only with
  # --verbose); no frame of ours fails, and our message is the one last line.
  frames = [line for line in result.stderr.splitlines() if line.startswith('  File "')]
  assert not any("/research/" in frame for frame in frames), result.stderr[-3000:]
  message = result.stderr[result.stderr.rindex("error: "):]
  assert message.strip().count("\n") == 0, message
  assert "Writing checkpoint step 2 to" in message and "Not a directory" in message
  assert "check that it is a folder you can write" in message
