"""`research.main`'s command line: parsed (every mistake one clear UserError) and built.

absl and ml_collections report a mistyped `--config.optimzer.lr` with a
KeyError traceback and a wrong type with "FATAL Flags parsing error" and exit
status 1. `parse` runs the same parsers and turns each failure into a message
that names the flag, the value given and what is accepted (main prints it and
exits with status 2). `parse_config` gives tests the same path in-process.

Programs that start runs (study trials, benchmarks, the accelerator check) build the
command with `main_command`, and config values with `override_flags`, so every run is
started with text these parsers read back to the same config.
"""

import difflib
import math
import numbers
import os
import re
import sys
from typing import Any, Iterable, Mapping

import ml_collections
from absl import flags
from ml_collections import config_flags

from research.errors import UserError

DEFAULT_CONFIG = "configs/default.py"

# What a config field of each type accepts on the command line.
_ACCEPTED_BY_TYPE = {
    bool: "true or false",
    int: "an integer, e.g. 3",
    float: "a number, e.g. 0.001 or 1e-3",
    str: "any text",
    tuple: "a tuple, e.g. '(32, 64)'",
}


def parse(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
  """Defines the `--config` flag in `flag_values`, parses `argv` into it and returns the
  positional arguments (argv[0] first). Raises UserError for any mistake.

  The config flag has no default of its own: ml_collections would load a default
  while the flag is defined, before any error could be caught, so `--config=`
  DEFAULT_CONFIG is put in front of the arguments when none is given.
  """
  if not any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  config_flags.DEFINE_config_file(
      "config", None, f"Config file, optionally with an argument: FILE[:ARG] "
      f"(default {DEFAULT_CONFIG}).", flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    remaining = flag_values(argv)
    config = flag_values["config"].value
    if not isinstance(config, ml_collections.ConfigDict):
      raise TypeError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
  except Exception as e:  # absl, ml_collections and the config file itself raise many types
    raise UserError(_explain(e, argv, flag_values)) from e
  return remaining


def parse_config(overrides: list[str], config_file: str = DEFAULT_CONFIG):
  """The config `research.main --config=CONFIG_FILE OVERRIDES...` would train; a
  UserError for any mistake. Uses fresh flags, so it can be called many times."""
  flag_values = flags.FlagValues()
  parse(["research.main", f"--config={config_file}", *overrides], flag_values)
  return flag_values["config"].value


def main_command(config_file: str, workdir: str, overrides: Iterable[str] = (), *,
                 mode: str | None = None, python: str = sys.executable) -> list[str]:
  """`python -m research.main [--mode=MODE] --config=CONFIG_FILE --workdir=WORKDIR
  OVERRIDES...` as an argv. `overrides` are --config.FIELD=VALUE flags (`override_flags`
  writes them from values), kept in order: the last one given for a field wins (but a
  tuple field given twice gets both, joined: ml_collections' repeated tuple flags). They
  come after --config, as ml_collections requires."""
  return [python, "-m", "research.main", *([f"--mode={mode}"] if mode else []),
          f"--config={config_file}", f"--workdir={workdir}", *overrides]


def override_flags(values: Mapping[str, Any]) -> list[str]:
  """{"optimizer.learning_rate": 3e-4, ...} -> ["--config.optimizer.learning_rate=0.0003", ...]."""
  return [f"--config.{field}={flag_value(value)}" for field, value in values.items()]


def flag_value(value) -> str:
  """The text of --config.FIELD=TEXT that the field's parser reads back as `value`: text
  as given (what a user types, e.g. '(16, 32)' for a tuple field), True/False, integers,
  floats with every digit (repr), tuples and lists as Python literals (ml_collections
  reads them with ast.literal_eval)."""
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    return _literal(tuple(value))
  return _scalar(value)


def _scalar(value) -> str:
  if type(value).__module__ == "numpy" and hasattr(value, "item"):
    value = value.item()  # a NumPy scalar (Optuna, a config built with NumPy): its Python value
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, numbers.Integral):
    return str(value)
  if isinstance(value, numbers.Real):
    return repr(float(value))
  raise TypeError(f"{value!r} ({type(value).__name__}) has no --config.FIELD=VALUE form: "
                  "give a str, bool, int, float, tuple or list.")


def _literal(value) -> str:
  """`value` as a Python literal that ast.literal_eval reads back."""
  if isinstance(value, str):
    return repr(value)
  if isinstance(value, (tuple, list)):
    items = [_literal(item) for item in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  if (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
      and not math.isfinite(value)):
    raise ValueError(f"{value!r} inside a tuple has no literal form (ast.literal_eval reads "
                     "no inf or nan).")
  return _scalar(value)


def _explain(error: Exception, argv: list[str], flag_values: flags.FlagValues) -> str:
  spec = _config_spec(argv)
  config, load_error = _load_config(spec)
  if load_error:
    return load_error
  for name in _override_names(argv):
    problem = _knob_hint(config, name, argv, spec) or _unknown_field(config, name)
    if problem:
      return f"--config.{name}={_value_of(argv, 'config.' + name)!r}: {problem}"
  if isinstance(error, flags.UnrecognizedFlagError):
    return (f"--{error.flagname} is not a flag of this program. Flags: "
            f"{', '.join(_main_flag_names(flag_values))}, and --config.FIELD=VALUE for any "
            "config field (--helpfull lists them all).")
  if type(error).__name__ == "FlagOrderError":  # ml_collections does not export its class
    return f"{error} Put --config=FILE before the --config.FIELD overrides."
  if isinstance(error, flags.IllegalFlagValueError):
    found = re.match(r"flag --([\w.-]+)=", str(error))
    if found:
      return _illegal_value(found.group(1), argv, config, flag_values, str(error))
  return f"the command line cannot be parsed: {_last_line(error)}"


def _config_spec(argv: list[str]) -> str:
  spec = DEFAULT_CONFIG
  for index, arg in enumerate(argv):
    if re.match(r"^--?config=", arg):
      spec = arg.split("=", 1)[1]
    elif re.match(r"^--?config$", arg) and index + 1 < len(argv):
      spec = argv[index + 1]
  return spec


def _load_config(spec: str):
  """(config, None), or (None, a message saying why `--config=spec` cannot be loaded)."""
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    others = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
        folder) else []
    listed = f" Config files in {folder}/: {', '.join(others)}." if others else ""
    return None, f"--config={spec!r}: there is no file {path!r}.{listed}"
  argv = ["research.main", f"--config={spec}"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
    config = flag_values["config"].value
    if not isinstance(config, ml_collections.ConfigDict):
      raise TypeError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
  except Exception as e:  # whatever the config file's own code raises
    return None, f"--config={spec!r} cannot be loaded: {_last_line(e)}"
  return config, None


def _override_names(argv: list[str]) -> list[str]:
  names = []
  for arg in argv[1:]:
    found = re.match(r"^--?(?:no)?config\.([^=\s]+)", arg)
    if found:
      names.append(found.group(1))
  return names


def _unknown_field(config, name: str) -> str | None:
  """Why `name` (e.g. 'optimizer.lr') is not a field of `config`, or None if it is."""
  node, walked = config, []
  for part in name.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"{'.'.join(walked)} is a single value ({node!r}), not a group of fields; "
              f"set it with --config.{'.'.join(walked)}=VALUE.")
    if part not in node:
      group = f"config.{'.'.join(walked)}" if walked else "the config"
      known = sorted(node.keys())
      close = difflib.get_close_matches(part, known, n=1)
      hint = ""
      if close:
        suggested = ".".join([*walked, close[0]])
        field = _declared(config).get(suggested)
        about = f" ({field.meaning}: {field.accepted()})" if field else ""
        hint = f" Did you mean --config.{suggested}{about}?"
      return f"{group} has no field {part!r}.{hint} Its fields: {', '.join(known)}."
    node = node[part]
    walked.append(part)
  return None


def _declared(config) -> dict:
  """{field: knobs.Field} that `config` may hold (config_schema.fields_for)."""
  from research.config import config_schema  # only for help and errors: it imports JAX

  return config_schema.fields_for(config)


def describe(config) -> str:
  """Help for every field of `config`: its value, what it accepts and what it means, as
  the declarations (config_schema and the registries' entries) say."""
  from research.config import config_schema

  declared = _declared(config)
  lines = []
  for name, value in config_schema.flatten(config).items():
    field = declared.get(name)
    about = f"{field.meaning}; {field.accepted()}" if field else "(not declared)"
    lines.append(f"--config.{name}={value!r}\n    {about}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  """`python -m research.command_line [--config=FILE[:ARG]] [--config.FIELD=VALUE ...]`:
  prints every field of that config with what it accepts and means."""
  try:
    flag_values = flags.FlagValues()
    parse(argv, flag_values)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)
  print(describe(flag_values["config"].value))


def _knob_hint(config, name: str, argv: list[str], spec: str) -> str | None:
  """How to set `name` (e.g. 'model.dropout_rate') when the config lacks it but the chosen
  model or optimizer has that knob: a config argument (`model=NAME`) puts the knobs in."""
  group, _, knob = name.partition(".")
  if group not in ("model", "optimizer") or "." in knob or group not in config:
    return None
  if knob in config[group]:
    return None
  from research import models
  from research.run import optim  # only on this error path: they import JAX

  chosen = _value_of(argv, f"config.{group}.name") or config[group].get("name")
  try:
    knobs = (models.defaults if group == "model" else optim.defaults)(chosen)
  except UserError:  # an unknown name: validation says so once the flags parse
    return None
  if knob not in knobs:
    return None
  path, _, argument = spec.partition(":")
  suggested = f"{path}:{','.join(filter(None, [argument, f'{group}={chosen}']))}"
  with_knobs, problem = _load_config(suggested)
  if problem or knob not in with_knobs.get(group, {}):
    return None  # this config file takes no such argument: today's message stands
  listed = ", ".join(f"{group}.{field}" for field in sorted(config[group]))
  value = _value_of(argv, f"config.{name}")
  return (f"{path} lists only {listed}; {chosen} has the knob {knob} (default "
          f"{knobs[knob]!r}): use --config={suggested} --config.{name}={value}")


def _illegal_value(name: str, argv: list[str], config, flag_values, message: str) -> str:
  value = _value_of(argv, name)
  if name.startswith("config."):
    field = name[len("config."):]
    current = config
    for part in field.split("."):
      current = current[part]
    if isinstance(current, ml_collections.ConfigDict):
      return (f"--{name}={value!r}: {field} is a group of fields ({', '.join(sorted(current))}); "
              f"set them one by one, e.g. --{name}.{sorted(current)[0]}=VALUE.")
    accepted = _ACCEPTED_BY_TYPE.get(type(current), f"a {type(current).__name__}")
    return f"--{name}={value!r} is not accepted: {accepted} (the config's value is {current!r})."
  flag = flag_values[name] if name in flag_values else None
  choices = getattr(getattr(flag, "parser", None), "enum_values", None)
  if choices:
    return f"--{name}={value!r} is not accepted: one of {', '.join(choices)}."
  reason = message.split(": ", 1)[-1] if value is not None else message
  return f"--{name}={value!r} is not accepted: {reason}."


def _value_of(argv: list[str], name: str):
  """The last value given to --name on the command line (None if absent)."""
  value = None
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{name}=") or arg.startswith(f"-{name}="):
      value = arg.split("=", 1)[1]
    elif arg in (f"--{name}", f"-{name}"):
      value = argv[index + 1] if index + 1 < len(argv) else ""
  return value


def _main_flag_names(flag_values: flags.FlagValues) -> list[str]:
  """This program's flags, without absl's own (logging, help) and config overrides."""
  own = {name for name in flag_values if "." not in name and name == flag_values[name].name
         and not flag_values.find_module_defining_flag(name, "").startswith("absl")}
  return [f"--{name}" for name in sorted(own)]


def _last_line(error: BaseException) -> str:
  """The useful part of an error whose text may embed a whole traceback."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__



if __name__ == "__main__":
  main(sys.argv)
