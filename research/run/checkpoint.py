"""Orbax checkpoints of the whole train state, with resume and best-by-metric.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. `state` is the TrainState
(params, optimizer and model state, step, RNG); the data position is the step
itself (see data.batch_indices). `meta` is JSON: the resolved config, the code
version, in stream mode the input stream's position (`input`, checked on resume:
see stream_input.py) and, for checkpoints written after an evaluation, its metrics.

Orbax writes each step into a temporary folder and renames it once complete, so
a checkpoint cut short by a crash is never listed. A step damaged afterwards (a
flaky or full network filesystem, a hand edit) is set aside into
WORKDIR/checkpoints_unreadable/ with a warning naming the damaged file, and the
newest readable step is used: the small files Orbax reads as JSON are checked before
the CheckpointManager is built (it reads some of them for every step), and the array
data by the restore itself. Kept: the last `keep` steps plus the best one by
`best_metric`.
"""

import json
import os
import re
import shutil
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import research
from research import mesh as mesh_lib, metrics
from research.errors import TrainingFailure, UserError



def code_version() -> dict:
  """Package version and git commit (with a dirty flag) of the running code."""
  root = research.REPOSITORY

  def git(*args):
    try:
      return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""

  commit = git("rev-parse", "HEAD")
  dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
  return {"package_version": research.__version__, "git_commit": commit or None, "git_dirty": dirty}


def restore_args(target) -> ocp.args.Composite:
  """Orbax's arguments to read a checkpoint's state into `target`: abstract arrays
  (jax.ShapeDtypeStruct) carrying the current mesh's shardings. Orbax then lays each
  array out for this run's devices and processes, whatever the checkpoint was written
  with; without them it would insist on the writer's device layout."""
  return ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())


def stored_on_this_mesh(stored, like, fallback):
  """Abstract arrays for every leaf of a checkpoint's state metadata `stored`: a leaf
  that `like` (a TrainState on the current mesh) also has, with the same shape, takes
  that leaf's sharding and dtype; any other (another optimizer's state, a classifier of
  another size) takes `fallback(shape)`, a sharding on the current mesh."""
  current = {name: leaf for name, leaf in _by_path(like).items() if hasattr(leaf, "sharding")}

  def abstract(path, leaf):
    mine = current.get(path_name(path))
    if mine is not None and tuple(mine.shape) == tuple(leaf.shape):
      return jax.ShapeDtypeStruct(mine.shape, mine.dtype, sharding=mine.sharding)
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=fallback(tuple(leaf.shape)))

  return jax.tree_util.tree_map_with_path(abstract, stored)


UNREADABLE_DIR = "checkpoints_unreadable"  # beside checkpoints/, in the workdir
# The text Orbax writes into each commit_success.txt (step and item level).
_COMMIT_MARK = re.compile(r"Checkpoint commit was successful to .*/(\d+)"
                          r"(?:\.orbax-checkpoint-tmp[^/]*)?(?:/(\w+))?")


def damage(step_dir: str, step: int) -> str | None:
  """Why Orbax could not read this step back, naming the damaged file, or None.

  Checks the files Orbax reads as JSON: `_CHECKPOINT_METADATA` (read for every step
  when a CheckpointManager is built), each item's folder, `meta/metadata`,
  `metrics/metrics` and `state/_METADATA`, and any `commit_success.txt`,
  `state/_sharding` and `state/array_metadatas/*` present (Orbax does without them
  on a local file system). The array data is checked by reading it: see `restore`.
  """
  if not os.path.isdir(step_dir):
    return "it is a file, not a folder"
  metadata, problem = _json_object(step_dir, "_CHECKPOINT_METADATA")
  if problem:
    return problem
  items = metadata.get("item_handlers")
  if not isinstance(items, dict):
    return "_CHECKPOINT_METADATA names no items (damaged)"
  for item in sorted({"state", "meta", *items}):
    if not os.path.isdir(os.path.join(step_dir, item)):
      return f"{item}/ is missing"
  required = ["meta/metadata", "state/_METADATA"] + (["metrics/metrics"] if "metrics" in items
                                                     else [])
  present = [name for name in ["state/_sharding"] + [
      f"state/array_metadatas/{entry}" for entry in _listing(step_dir, "state/array_metadatas")]
             if os.path.lexists(os.path.join(step_dir, name))]
  for name in required + present:
    problem = _json_object(step_dir, name)[1]
    if problem:
      return problem
  for item in ["", *sorted(items)]:
    name = os.path.join(item, "commit_success.txt")
    if os.path.lexists(os.path.join(step_dir, name)):
      problem = _commit_mark_problem(os.path.join(step_dir, name), step, item or None)
      if problem:
        return f"{name}: {problem}"
  return None


def _listing(step_dir: str, folder: str) -> list[str]:
  try:
    return sorted(os.listdir(os.path.join(step_dir, folder)))
  except OSError:
    return []


def _json_object(step_dir: str, name: str):
  """(the JSON object in step_dir/name, None) or (None, what is wrong with the file)."""
  try:
    with open(os.path.join(step_dir, name), "rb") as f:
      content = f.read()
  except FileNotFoundError:
    return None, f"{name} is missing"
  except OSError as e:
    return None, f"{name} cannot be read ({e.strerror or e})"
  try:
    value = json.loads(content.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    kind = "empty" if not content else "not valid JSON, truncated or overwritten"
    return None, f"{name} is damaged ({kind}: {str(e)[:100]})"
  if not isinstance(value, dict):
    return None, f"{name} is damaged (not a JSON object)"
  return value, None


def _commit_mark_problem(path: str, step: int, item: str | None) -> str | None:
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    return f"damaged ({e})"
  found = _COMMIT_MARK.fullmatch(text.strip())
  if found is None or int(found.group(1)) != step or found.group(2) != item:
    return "damaged (not the text Orbax writes)"
  return None


class _ReadableSteps:
  """Orbax's standard step names, without the steps found damaged: a CheckpointManager
  built with it never reads them (a read-only one cannot move them out of its way)."""

  def __init__(self):
    self.unreadable: set[int] = set()
    self._standard = ocp.path.step.standard_name_format()

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_step(self, base_path, step: int):
    if step in self.unreadable:
      raise ValueError(f"Checkpoint step {step} in {base_path} cannot be read.")
    return self._standard.find_step(base_path, step)

  def find_all(self, base_path):
    return (found for found in self._standard.find_all(base_path)
            if found.step not in self.unreadable)

  def __getattr__(self, name):
    return getattr(self._standard, name)


class Checkpointer:
  """Saves and restores TrainStates in WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: str = "accuracy",
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.best_metric = best_metric
    self.read_only = read_only
    self._steps_format = _ReadableSteps()
    self._screen()
    mode = metrics.better(best_metric)  # each metric says which way is better
    metric = lambda metrics: metrics[best_metric]
    # LatestN alone would evict the best step; BestN alone would evict recent ones.
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=metric, reverse=(mode == "min"), n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=metric, best_mode=mode,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        step_name_format=self._steps_format,
    )
    self._started = []  # steps whose save this Checkpointer started
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def save(self, state, meta: dict, metrics: dict | None = None) -> None:
    """Starts an (async) save of `state` at its step; `metrics` mark it for best-keeping."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._started.append(step)
    try:  # Orbax first waits for the previous save, whose failure surfaces here
      self.manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:
      raise self._write_failure(e) from e

  def wait(self) -> None:
    """Blocks until every started save is durable on disk."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_failure(e) from e

  def _write_failure(self, error: Exception) -> TrainingFailure:
    """A failed write (disk full, permissions, ...) as a TrainingFailure naming the step;
    its half-written temporary folder is removed, the finished checkpoints stay.

    It never raises itself: whatever the clean-up meets (the checkpoints folder gone or
    replaced by a file) goes into the message instead."""
    text = str(error)
    reason = ("the disk is full (No space left on device)" if "No space left" in text
              else text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__)
    try:
      self.manager.reload()
      finished = set(self.manager.all_steps())
      failed = sorted(set(self._started) - finished)
      if jax.process_index() == 0:
        for step in failed:
          for entry in os.listdir(self.directory):
            if entry.startswith(f"{step}.") and "tmp" in entry:
              shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)
    except Exception as listing_error:  # the folder itself is the problem
      return TrainingFailure(
          f"Writing checkpoint step {self._started[-1] if self._started else '?'} to "
          f"{self.directory} failed: {reason}. The checkpoints folder cannot be listed either "
          f"({type(listing_error).__name__}: {str(listing_error)[:200]}): check that it is a "
          "folder you can write, then rerun the same command to resume from the last "
          "checkpoint there.")
    last_good = max(finished) if finished else None
    kept = ("No earlier checkpoint exists." if last_good is None else
            f"The previous checkpoint (step {last_good}) is untouched: rerun the same command "
            "to resume from it.")
    return TrainingFailure(
        f"Writing checkpoint step {', '.join(map(str, failed)) or '?'} to {self.directory} "
        f"failed: {reason}. Nothing was written in place of an existing checkpoint. {kept} "
        "Free space there (or fix its permissions) first.")

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def restore(self, abstract_state, step: int | None = None):
    """Restores `step` (default: the newest readable one) -> (state, meta) or None.

    Unreadable steps are set aside with a warning naming them; None (start afresh)
    when no step is left.
    """
    self._log_incomplete()
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    for candidate in candidates:
      self._check_shapes(candidate, abstract_state)
      try:
        restored = self.manager.restore(candidate, args=restore_args(abstract_state))
      except Exception as e:  # a damaged step can fail in many layers of Orbax/TensorStore
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        if step is not None:
          raise UserError(f"Checkpoint step {candidate} in {self.directory} cannot be read: "
                          f"{reason}") from e
        self._set_aside(candidate, f"reading it fails ({reason})")
        continue
      return restored.state, restored.meta
    if self._steps_format.unreadable:
      logging.warning("No readable checkpoint in %s (the unreadable ones are in %s): starting "
                      "from scratch.", self.directory, self._unreadable_dir())
    return None

  def stored_config(self) -> tuple[int, dict] | None:
    """(step, config) from the newest step whose `meta` item holds a config, or None."""
    for step in sorted(self.steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      except Exception as e:  # damaged: an older step may still hold it
        logging.warning("Checkpoint step %d in %s: its stored config cannot be read (%s).", step,
                        self.directory, str(e)[:200])
        continue
      if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return step, meta["config"]
    return None

  def _unreadable_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)

  def _screen(self) -> None:
    """Sets aside every step whose small files are damaged, before Orbax reads them."""
    try:
      entries = sorted(os.listdir(self.directory), key=lambda e: (len(e), e))
    except OSError:  # absent (a fresh run); the workdir check reports the rest
      entries = []
    damaged = {}
    for entry in entries:
      if entry.isdigit():
        problem = damage(os.path.join(self.directory, entry), int(entry))
        if problem:
          damaged[int(entry)] = problem
    multi = jax.process_count() > 1 and not self.read_only
    if multi:  # every process has looked before process 0 moves anything
      _sync("checkpoint_screened")
    for step, problem in damaged.items():
      self._set_aside(step, problem, sync=False)
    if multi:
      _sync("checkpoint_set_aside")

  def _set_aside(self, step: int, problem: str, sync: bool = True) -> None:
    """Moves an unreadable step out of the manager's way (kept for inspection, never
    deleted), so that training can write that step again; a read-only Checkpointer
    only stops listing it."""
    self._steps_format.unreadable.add(step)
    source = os.path.join(self.directory, str(step))
    if self.read_only:
      logging.warning("Skipping checkpoint step %d in %s: %s (left in place: this reader only "
                      "reads).", step, self.directory, problem)
    elif jax.process_index() == 0:
      target = os.path.join(self._unreadable_dir(), f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      try:
        os.makedirs(self._unreadable_dir(), exist_ok=True)
        os.replace(source, target)
        moved = f"moved it to {target}"
      except OSError as e:
        moved = f"it could not be moved to {self._unreadable_dir()} ({e.strerror or e}), so it stays, unused"
      logging.warning("Skipping checkpoint step %d in %s: %s; %s.", step, self.directory,
                      problem, moved)
    if sync and jax.process_count() > 1 and not self.read_only:
      _sync(f"set_aside_checkpoint_{step}")
    if hasattr(self, "manager"):
      self.manager.reload()

  def resolve_step(self, which) -> int:
    """'latest', 'best' or a step number -> an existing step, or a UserError listing them."""
    available = self.steps()
    if not available:
      raise UserError(f"No checkpoint in {self.directory}: train first, or check --workdir.")
    which = str(which).strip()
    if which == "latest":
      return available[-1]
    if which == "best":
      best = self.best_step()
      if best is None:
        raise UserError(f"No evaluated checkpoint in {self.directory} to call 'best'.")
      return best
    if which.isdigit() and int(which) in available:
      return int(which)
    raise UserError(f"eval.checkpoint_step={which!r} is not available. Accepted: 'latest', "
                    f"'best' or one of the steps {available}.")

  def _log_incomplete(self) -> None:
    if not os.path.isdir(self.directory):
      return
    for entry in sorted(os.listdir(self.directory)):
      if "tmp" in entry:
        logging.warning("Ignoring incomplete checkpoint %s (its write never finished).",
                        os.path.join(self.directory, entry))

  def _check_shapes(self, step: int, abstract_state) -> None:
    """Fails with the names of parameters whose stored shape differs from the model's."""
    try:
      stored = self.manager.item_metadata(step).state
    except Exception:  # unreadable metadata: let restore report or skip this step
      return
    if stored is None:
      return
    expected = _shapes_by_path(abstract_state)
    found = _shapes_by_path(stored)
    problems = [f"{path}: checkpoint {found.get(path, 'missing')}, model {shape}"
                for path, shape in expected.items() if found.get(path) != shape]
    problems += [f"{path}: in checkpoint only" for path in found if path not in expected]
    if problems:
      raise UserError(
          f"Checkpoint step {step} in {self.directory} does not fit this model/optimizer:\n  "
          + "\n  ".join(problems[:20]) + "\nUse a fresh --workdir, or the config the "
          "checkpoint was written with (saved in WORKDIR/config.json).")

  def close(self) -> None:
    self.manager.close()


def _sync(name: str) -> None:
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices(name)


def initialize_from(state, source: str, num_classes: int, reinit_head: bool):
  """Returns `state` with params and model state taken from another run's latest checkpoint.

  `source` is that run's workdir (or its checkpoints/ folder). With `reinit_head`, arrays
  whose last axis is the class count and differs keep their fresh initialization.
  """
  source = os.path.abspath(source)
  workdir = os.path.dirname(source) if os.path.basename(source) == "checkpoints" else source
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UserError(f"init_from={source!r} has no checkpoints/ folder; give a training workdir.")
  other = Checkpointer(workdir, read_only=True)
  step = other.resolve_step("latest")
  # Read onto this run's mesh, whatever device count wrote it: arrays this state has
  # keep its layout; the rest (e.g. optimizer state, dropped below) is split over the
  # devices along its largest axis that divides, to hold as little as possible.
  whole = state.step.sharding  # a scalar's: on every device of this run (or the only one)
  mesh = getattr(whole, "mesh", None)
  fallback = ((lambda shape: mesh_lib.split_sharding(shape, mesh)) if mesh is not None
              else (lambda shape: whole))
  target = stored_on_this_mesh(other.manager.item_metadata(step).state, state, fallback)
  restored = other.manager.restore(step, args=restore_args(target))
  other.close()
  stored = restored.state
  taken = {}
  for name in ("params", "model_state"):
    fresh, found = getattr(state, name), _by_path(stored.get(name, {}))
    problems, reinitialized, shapes = [], [], []  # shapes: (in the source, here) of misfits

    def pick(path, leaf):
      key = path_name(path)
      if key not in found:
        problems.append(f"{name}/{key}: missing in {workdir}")
        return leaf
      value = found[key]
      if tuple(np.shape(value)) == leaf.shape:
        return value  # already in this leaf's dtype and sharding (stored_on_this_mesh)
      if reinit_head and leaf.shape[-1] == num_classes:
        reinitialized.append(f"{name}/{key}")
        return leaf
      problems.append(f"{name}/{key}: {tuple(np.shape(value))} in {workdir}, {leaf.shape} here")
      shapes.append((tuple(np.shape(value)), tuple(leaf.shape)))
      return leaf

    taken[name] = jax.tree_util.tree_map_with_path(pick, fresh)
    expected = set(_by_path(fresh))
    problems += [f"{name}/{key}: in {workdir} only" for key in found if key not in expected]
    if problems:
      head_only = len(shapes) == len(problems) and all(
          len(source) == len(here) > 0 and source[:-1] == here[:-1] and here[-1] == num_classes
          for source, here in shapes)
      raise UserError(_init_from_mismatch(problems, workdir, head_only and not reinit_head))
    if reinitialized:
      logging.info("init_from: re-initialized %s (class count differs).", ", ".join(reinitialized))
  logging.info("Initialized from %s step %d.", workdir, step)
  return state.replace(**taken)


def _init_from_mismatch(problems: list[str], workdir: str, suggest_reinit_head: bool) -> str:
  """The message for arrays that do not fit: re-initializing the classifier is suggested
  only when the class count is all that differs."""
  listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more"
                                         if len(problems) > 20 else "")
  if suggest_reinit_head:
    return (f"init_from does not fit this model: only the classifier differs (the class count):"
            f"\n  {listed}\nSet --config.init_reinit_head=True to re-initialize the classifier.")
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      source_model = json.load(f)["model"]
    trained_with = f" ({workdir} trained model.name={source_model['name']!r})"
  except (OSError, ValueError, KeyError, TypeError):
    trained_with = ""
  return (f"init_from does not fit this model: the architectures differ{trained_with}, so no "
          f"re-initialization of the classifier can make them fit:\n  {listed}\nGive "
          "--config.init_from a run of the same model and model settings, or train from scratch.")


def path_name(path) -> str:
  """'params/Dense_0/kernel' for any pytree path; dataclass fields, dict keys and list
  indices look alike, so a tree and its stored metadata name leaves the same way."""
  parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  return "/".join(str(part) for part in parts)


def _by_path(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_name(path): leaf for path, leaf in flat}


def _shapes_by_path(tree) -> dict[str, tuple]:
  return {name: tuple(getattr(leaf, "shape", np.shape(leaf)))
          for name, leaf in _by_path(tree).items()}


def fingerprint(params) -> str:
  """A short hash of the parameters' bytes in a fixed (path-sorted) order.

  Parameters split over several processes (config.shard_params) are gathered
  first, so every process must call this at the same point.
  """
  import hashlib

  digest = hashlib.sha256()
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in sorted(flat, key=lambda item: path_name(item[0])):
    digest.update(path_name(path).encode())
    digest.update(np.ascontiguousarray(_whole_value(leaf)).tobytes())
  return digest.hexdigest()[:12]


def _whole_value(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(jax.device_get(leaf))
