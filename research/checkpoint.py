"""Orbax checkpoints of the whole train state, with resume and best-by-metric.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. `state` is the TrainState
(params, optimizer and model state, step, RNG); the data position is the step
itself (see data.batch_indices). `meta` is JSON: the resolved config, the code
version, in stream mode the input stream's position (`input`, checked on resume:
see input_pipeline.py) and, for checkpoints written after an evaluation, its metrics.

Orbax writes each step into a temporary folder and renames it once complete, so
a checkpoint cut short by a crash is never listed; restore also falls back to an
older step when the newest cannot be read. Kept: the last `keep` steps plus the
best one by `best_metric`.
"""

import os
import shutil
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import research
from research import mesh as mesh_lib
from research.errors import TrainingFailure, UserError

# Metrics an evaluation produces that can pick the "best" checkpoint, and which way is better.
BEST_METRIC_MODES = {"accuracy": "max", "loss": "min"}


def code_version() -> dict:
  """Package version and git commit (with a dirty flag) of the running code."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


class Checkpointer:
  """Saves and restores TrainStates in WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: str = "accuracy",
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.best_metric = best_metric
    mode = BEST_METRIC_MODES[best_metric]
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
    its half-written temporary folder is removed, the finished checkpoints stay."""
    self.manager.reload()
    finished = set(self.manager.all_steps())
    failed = sorted(set(self._started) - finished)
    if jax.process_index() == 0:
      for step in failed:
        for entry in os.listdir(self.directory):
          if entry.startswith(f"{step}.") and "tmp" in entry:
            shutil.rmtree(os.path.join(self.directory, entry), ignore_errors=True)
    text = str(error)
    reason = ("the disk is full (No space left on device)" if "No space left" in text
              else text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__)
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

    Unreadable newer checkpoints are skipped with a warning naming them.
    """
    self._log_incomplete()
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    for candidate in candidates:
      self._check_shapes(candidate, abstract_state)
      try:
        restored = self.manager.restore(candidate, args=restore_args(abstract_state))
      except Exception as e:  # a damaged step can fail in many layers of Orbax/TensorStore
        if step is not None:
          raise UserError(f"Checkpoint step {candidate} in {self.directory} cannot be read: "
                          f"{type(e).__name__}: {e}") from e
        logging.warning("Skipping checkpoint step %d in %s: it cannot be read (%s: %s).",
                        candidate, self.directory, type(e).__name__, str(e)[:300])
        self._set_aside(candidate)
        continue
      return restored.state, restored.meta
    return None

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's way (kept for inspection, never
    deleted), so that training can write that step again."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      os.replace(os.path.join(self.directory, str(step)), target)
      logging.warning("Moved unreadable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set_aside_checkpoint_{step}")
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
    problems, reinitialized = [], []

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
      return leaf

    taken[name] = jax.tree_util.tree_map_with_path(pick, fresh)
    if problems:
      hint = (" Set --config.init_reinit_head=True to re-initialize the classifier."
              if not reinit_head else "")
      raise UserError("init_from does not fit this model:\n  " + "\n  ".join(problems[:20]) + hint)
    if reinitialized:
      logging.info("init_from: re-initialized %s (class count differs).", ", ".join(reinitialized))
  logging.info("Initialized from %s step %d.", workdir, step)
  return state.replace(**taken)


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
