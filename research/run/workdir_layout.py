"""What a workdir holds, and a check, before a run writes, that each path is the right kind.

A hand-edited or damaged workdir (a file named `checkpoints`, a folder named
`metrics.jsonl`, a folder the run may not enter) would otherwise fail deep inside
Orbax, TensorBoard or the log writer, after training started, or hang. `check` runs
before the workdir lock is taken and before anything is written: it refuses with one
line naming the path, what it is, what belongs there, and how to fix it; nothing in the
workdir is changed.
"""

import os

from research.errors import UserError

FILE, FOLDER = "file", "folder"

# Every path a run keeps in its workdir: its kind and what it is for.
ENTRIES = {
    "config.json": (FILE, "the resolved config"),
    "run.json": (FILE, "what ran, on what, and how it ended"),
    "metrics.jsonl": (FILE, "the run's record of metrics"),
    "eval.jsonl": (FILE, "results of --mode=eval"),
    "run.lock": (FILE, "the lock of the run that owns the workdir"),
    "checkpoints": (FOLDER, "the run's checkpoints"),
    "checkpoints_unreadable": (FOLDER, "checkpoints set aside because they cannot be read"),
    "tensorboard": (FOLDER, "TensorBoard event files"),
    "profile": (FOLDER, "profiler traces (--config.profile_steps)"),
}


def check(workdir: str, writing: bool = True) -> None:
  """A UserError naming the first path of `workdir` that is of the wrong kind or cannot
  be used (read, and with `writing` also written); None when all is well or the workdir
  does not exist yet."""
  workdir = os.path.abspath(workdir)
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a folder. Give a folder: a new one, or "
                    "the workdir of an earlier run to resume it.")
  if not os.path.isdir(workdir):
    return
  _usable(workdir, FOLDER, f"--workdir={workdir}", writing)
  for name, (kind, meaning) in ENTRIES.items():
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue
    if not os.path.exists(path):
      raise UserError(f"{path} is a broken link (it points to {os.readlink(path)!r}); a run keeps "
                      f"{meaning} there. Remove the link or make it point to a {kind}; nothing "
                      "was changed.")
    found = FOLDER if os.path.isdir(path) else FILE
    if found != kind:
      raise UserError(f"{path} is a {found}, but a run keeps a {kind} there ({meaning}). Move it "
                      "out of the way (or use another --workdir); nothing was changed.")
    _usable(path, kind, path, writing)


def _usable(path: str, kind: str, name: str, writing: bool) -> None:
  """Opens `path` the way a run will (a folder listed, a file read) and checks write access."""
  try:
    if kind == FOLDER:
      os.listdir(path)
    else:
      with open(path, "rb"):
        pass
  except OSError as e:
    raise UserError(f"{name} cannot be read: {e.strerror or e} ({path}). Fix its permissions, or "
                    "use another --workdir; nothing was changed.") from e
  mode = os.W_OK | (os.X_OK if kind == FOLDER else 0)
  if writing and not os.access(path, mode):
    reason = "Read-only file system" if _read_only_mount(path) else "Permission denied"
    raise UserError(f"{name} cannot be written: {reason} ({path}). Fix its permissions, or use "
                    "another --workdir; nothing was changed.")


def _read_only_mount(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False
