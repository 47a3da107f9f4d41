"""The config a workdir was started with: read it, repair it, compare a new one with it.

A workdir belongs to one experiment. `check(config, workdir, allow_change)` refuses
a config that differs from WORKDIR/config.json (training calls it once it holds the
workdir's lock); `stored(workdir, repair)` reads that file, rebuilding a damaged one
from the newest readable checkpoint; `read_stored` turns a stored config into the
ConfigDict today's code reads (evaluation, predictions). Comparisons go through
config_schema, so a field that newer code added at its default is no change.
"""

import json
import os

import jax
import ml_collections
from absl import logging

from research.config import config_schema
from research.errors import UserError
from research.run import optim

# Fields that change how a run executes, never what it computes: any value resumes.
EXECUTION_ONLY = ("dataset.reader_threads", "dataset.workers", "compile_cache")


_ABSENT = object()


def _same(stored, given) -> bool:
  """Equal as config.json holds them (tuples are JSON lists)."""
  plain = lambda value: list(value) if isinstance(value, tuple) else value
  return plain(stored) == plain(given)


def changed_fields(stored_config: dict, config) -> list[str]:
  """What differs between the config a workdir stored and `config`, as lines.

  Config evolution: a field the stored config lacks (newer code added it) is no change
  when `config` holds its declared default; a field `config` lacks is no change when the
  stored value was its default; a stored field the current code declares nowhere is no
  longer read (named in a warning, not a change)."""
  stored = config_schema.flatten(stored_config)
  given = config_schema.flatten(json.loads(config.to_json_best_effort()))
  declared = config_schema.fields_for(config)
  declared_then = config_schema.fields_for(ml_collections.ConfigDict(stored_config))
  unknown = sorted(key for key in stored if key not in given and key not in declared
                   and key not in declared_then)
  if unknown:
    logging.warning("The workdir's config has fields this code no longer reads (ignored): %s.",
                    ", ".join(unknown))
  changed = []
  for key in sorted(set(stored) | set(given)):
    before, now = stored.get(key, _ABSENT), given.get(key, _ABSENT)
    if key in EXECUTION_ONLY or key in unknown or (before is not _ABSENT and now is not _ABSENT
                                                   and _same(before, now)):
      continue
    field = declared.get(key) or declared_then.get(key)
    default = field.default if field is not None else _ABSENT
    if (before is _ABSENT and _same(now, default)) or (now is _ABSENT and _same(before, default)):
      continue  # a field added or dropped at its default computes what it did
    changed.append(f"  {key}: {'<absent>' if before is _ABSENT else repr(before)} in the "
                   f"workdir, {'<absent>' if now is _ABSENT else repr(now)} now")
  return changed


def read_stored(stored_config: dict):
  """A config a workdir stored (config.json, or a checkpoint's meta), read through the
  current schema: fields of the run, the optimizer's common fields and the schedules'
  that newer code added take their declared defaults; fields the code no longer declares
  are dropped, named in a warning. A ConfigDict, like the one the run was trained with."""
  config = ml_collections.ConfigDict(stored_config)
  declared = config_schema.fields_for(config)
  flat = config_schema.flatten(config)
  unknown = sorted(key for key in flat if key not in declared)
  if unknown:
    logging.warning("The stored config has fields this code no longer reads (ignored): %s.",
                    ", ".join(unknown))
  tree = json.loads(config.to_json_best_effort())
  for key in unknown:
    *groups, leaf = key.split(".")
    node = tree
    for group in groups:
      node = node[group]
    del node[leaf]
  for key, field in declared.items():
    section = key.split(".")[0]
    if key in flat or (section in config_schema.REGISTRY_SECTIONS
                       and key.split(".", 1)[1] not in optim.COMMON):
      continue  # a model's or optimizer's own knobs default in the code itself
    *groups, leaf = key.split(".")
    node = tree
    for group in groups:
      node = node.setdefault(group, {})
    node[leaf] = field.default
  return ml_collections.ConfigDict(tree)


def check(config, workdir: str, allow_change: bool) -> None:
  """A workdir belongs to one experiment: refuse a different config unless allowed."""
  found = stored(workdir, repair=jax.process_index() == 0)
  if found is None:
    return
  changed = changed_fields(found, config)
  if changed and not allow_change:
    raise UserError(f"The config differs from the one {workdir} was started with:\n"
                    + "\n".join(changed) + "\nUse another --workdir, or pass "
                    "--allow_config_change to continue this run with the new values.")


def stored(workdir: str, repair: bool) -> dict | None:
  """The config `workdir` was started with (WORKDIR/config.json), or None if it has none.

  A config.json that cannot be read (truncated, overwritten) is rebuilt from the config
  stored in the newest readable checkpoint's `meta`, with a warning; with `repair` the
  rebuilt config replaces it (the damaged file is kept beside it, as config.json.unreadable).
  A UserError when no checkpoint holds one either.
  """
  from research.run import checkpoint  # the checkpoints are only read when config.json is damaged

  path = os.path.join(workdir, "config.json")
  if not os.path.lexists(path):
    return None
  try:
    with open(path) as f:
      stored_config = json.load(f)
    if not isinstance(stored_config, dict):
      raise ValueError("not a JSON object")
    return stored_config
  except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
    problem = f"{type(e).__name__}: {str(e)[:200]}"
  checkpoints = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    found = checkpoints.stored_config()
  finally:
    checkpoints.close()
  if found is None:
    raise UserError(f"{path} cannot be read ({problem}), and no checkpoint in "
                    f"{checkpoints.directory} holds the config to rebuild it from. Move it away "
                    "to start this workdir afresh, or use another --workdir.")
  step, stored_config = found
  kept = ""
  if repair:
    os.replace(path, path + ".unreadable")
    with open(path + ".tmp", "w") as f:
      json.dump(stored_config, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    kept = f" and wrote it back (the damaged file is kept as {path}.unreadable)"
  logging.warning("%s cannot be read (%s): using the config stored in checkpoint step %d%s.",
                  path, problem, step, kept)
  return stored_config
