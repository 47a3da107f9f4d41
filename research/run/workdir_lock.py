"""One training run per workdir: WORKDIR/run.lock names the run that owns it.

Two runs writing the same checkpoints and metrics would destroy each other's
work, so training holds the lock for its whole life. The lock is an exclusive
`flock` on WORKDIR/run.lock, whose text says who holds it (pid, host, start
time, command): the kernel drops the flock when its process dies, even by
SIGKILL, so a lock file left by a dead run is stale and is taken over with a
warning naming that run. A clean exit (finished, preempted or failed) removes
the file. In a multi-process run process 0 holds the lock for all processes.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time

import jax
from absl import logging

from research.errors import UserError
from research.run import distributed, workdir_layout

LOCK_FILE = "run.lock"


class WorkdirLock:
  """`with WorkdirLock(workdir):` refuses (UserError) while another live run holds it.

  A workdir that this lock created and that is still empty on release is removed
  again, so that a run refused by a config check leaves nothing behind.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None
    self._created_workdir = False

  def __enter__(self):
    problem = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except UserError as e:
        problem = e
    # Every process refuses together, or a refused process 0 would leave the others waiting.
    if distributed.any_process(problem is not None):
      raise problem or UserError(f"Process 0 could not lock {self.workdir}; see its message.")
    return self

  def __exit__(self, *exc):
    self.release()

  def _acquire(self) -> None:
    workdir_layout.check(self.workdir)  # each path the right kind, before anything is written
    self._created_workdir = not os.path.isdir(self.workdir)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      in_the_way = _file_on_the_way(self.workdir)
      if in_the_way:
        raise UserError(f"--workdir={self.workdir} cannot be created: {in_the_way} is a file, "
                        "not a folder. Choose another --workdir.") from e
      raise UserError(f"--workdir={self.workdir} cannot be written: {e.strerror or e} "
                      f"({e.filename or self.workdir}). Choose a writable folder, or fix its "
                      "permissions or free space.") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      owner = _read_owner(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise UserError(f"Cannot lock {self.path}: {e.strerror or e}. The workdir's file "
                        "system must support file locks (flock).") from e
      raise UserError(f"{self.workdir} is in use by a live run ({_describe(owner)}). Wait for "
                      "it to finish, stop it (SIGTERM checkpoints and exits), or use another "
                      "--workdir.") from e
    if os.fstat(fd).st_ino != _inode(self.path):
      # The previous owner removed the file between our open and our flock: retry on
      # the new file, or two runs would each hold a lock on a different file.
      os.close(fd)
      return self._acquire()
    previous = _read_owner(fd)
    if previous:
      logging.warning("Taking over the stale lock of a run that is gone (%s): it did not exit "
                      "cleanly (killed, or its machine went down). Its last checkpoint is "
                      "resumed as usual.", _describe(previous))
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      raise UserError(f"--workdir={self.workdir} cannot be written: {e.strerror or e} "
                      f"({self.path}). Free some space or choose another --workdir.") from e
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    # Unlink before unlocking: a run waiting on this file then sees another inode and retries.
    try:
      os.unlink(self.path)
    except OSError as e:
      logging.warning("Could not remove %s: %s", self.path, e)
    os.close(self._fd)  # drops the flock
    self._fd = None
    if self._created_workdir:
      try:
        os.rmdir(self.workdir)  # only succeeds when nothing was written
      except OSError:
        pass


def _file_on_the_way(path: str) -> str | None:
  """The nearest existing ancestor of `path` (or `path` itself) when it is not a folder."""
  while path and not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent
  return path if path and not os.path.isdir(path) else None


def _inode(path: str) -> int | None:
  try:
    return os.stat(path).st_ino
  except FileNotFoundError:
    return None


def _read_owner(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
  except OSError:
    return {}
  if not text:
    return {}
  try:
    owner = json.loads(text)
    return owner if isinstance(owner, dict) else {"text": text}
  except ValueError:
    return {"text": text[:200]}


def _describe(owner: dict) -> str:
  if not owner:
    return "owner unknown"
  if "pid" not in owner:
    return f"lock text {owner.get('text', owner)!r}"
  return (f"pid {owner.get('pid')} on host {owner.get('host')}, started "
          f"{owner.get('started')}: {owner.get('command', '')}")
