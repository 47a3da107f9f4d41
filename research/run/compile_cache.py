"""JAX's persistent compilation cache: compiled programs kept on disk between runs.

`set_up(config.compile_cache)` runs once per process, in research.main before anything
compiles. A second identical run (a requeued SLURM job, the next trial of a study, the
other processes of a multi-process run) then loads its programs instead of compiling
them again (docs/performance.md has the measured time to first step).

Where (`config.compile_cache`):
  * "auto" (the default): $JAX_COMPILATION_CACHE_DIR if set (JAX's own variable; the
    test suite may set it), else $XDG_CACHE_HOME/research/jax, else ~/.cache/research/jax:
    one folder per user, shared by all of that user's runs;
  * a folder: that one (e.g. on storage every host of a cluster sees);
  * "off": no cache (as is JAX_ENABLE_COMPILATION_CACHE=false).

Safe with several writers: the cache has a size limit (`MAX_BYTES`, least recently
used entries evicted), and with a limit JAX takes a file lock (the filelock package)
around every read and write of an entry. Without one, JAX 0.10 writes entries in place
(`Path.write_bytes`, not a rename), so a run could read another's half-written entry.
In a multi-process run only process 0 writes (JAX's rule); all processes read.
A cache that cannot be used costs a warning, never the run: an unwritable folder is
found here and the run compiles without a cache; an entry that is damaged is JAX's
"Error reading persistent compilation cache entry" warning, and that program is compiled.
An entry without its access-time file (written by a JAX program without a size limit, or
by a run killed between the two files) would make JAX 0.10 fail every later write ("Error
writing persistent compilation cache entry ... -atime": it reads every entry's time before
each write); set_up gives such entries one.
"""

import glob
import os
import tempfile

from absl import logging

OFF = "off"
AUTO = "auto"
# Least recently used entries go beyond this size (and the limit turns on JAX's locks).
MAX_BYTES = 8 * 2**30
# Programs compiling in less time are not worth a file: JAX's default (1 s) would skip
# most CPU programs, whose compiles take 0.1-1 s.
MIN_COMPILE_SECONDS = 0.1


def folder(setting: str, environ=os.environ) -> str | None:
  """The cache folder `setting` ("auto", "off" or a folder) names, or None for off."""
  if setting == OFF:
    return None
  if setting and setting != AUTO:
    return os.path.expanduser(setting)
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "research", "jax")


def set_up(setting: str = AUTO) -> str | None:
  """Points JAX's persistent compilation cache at `setting`'s folder; returns the folder,
  or None when the cache is off or unusable (then with a warning)."""
  import jax

  path = folder(setting)
  if path is None or not jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  try:  # JAX would fail on every compile, with a warning each time: check once here
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".writable-"):
      pass
  except OSError as error:
    logging.warning("The compilation cache %s cannot be used (%s): compiling without it. "
                    "Name a writable folder with --config.compile_cache=FOLDER, or turn it "
                    "off with --config.compile_cache=off.", path,
                    error.strerror or error)
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  _give_entries_access_times(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)  # any size
  return path


def _give_entries_access_times(path: str) -> None:
  """Writes the access-time file JAX's size limit needs for each entry that lacks one (the
  module docstring), dated by the entry's own modification time, the order JAX keeps."""
  for entry in glob.glob(os.path.join(glob.escape(path), "*-cache")):
    access_time = entry[:-len("cache")] + "atime"
    if os.path.exists(access_time):
      continue
    try:
      stamp = os.stat(entry).st_mtime_ns.to_bytes(8, "little")
      with open(access_time, "xb") as f:  # never over one another process just wrote
        f.write(stamp)
    except OSError:  # written or evicted meanwhile by another process
      pass
