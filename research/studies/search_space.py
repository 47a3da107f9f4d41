"""Search spaces of a study: which config fields vary, and over what.

  optimizer.learning_rate=loguniform(1e-4,3e-2); batch_size=choice(32,64,128)
  model.conv_features=choice((16, 32),(32, 64)); num_epochs=int(2,10,step=2)
  optimizer.name=adam,sgd                        # a grid axis: today's sweep syntax

Each entry is `FIELD=SPEC`, entries separated by ';' or by lines (a file may have
# comments). SPEC is loguniform(a,b), uniform(a,b), int(a,b[,step=k]),
choice(v1,v2,...) or plain values v1,v2,... (a grid axis; a choice for the random
and TPE samplers). Commas inside parentheses belong to a value, so tuples work.

`check` proves every value a study could give before any trial starts: each
choice, and both ends of each range, goes through the same parsing and checks
as `research.main` (command_line.parse_config, config_validation.validate).
Values travel to trials as text, the way a user types `--config.FIELD=VALUE`.
"""

import dataclasses
import itertools
import math
import re

from research.errors import UserError

ACCEPTED = ("Accepted: FIELD=loguniform(LOW,HIGH), FIELD=uniform(LOW,HIGH), "
            "FIELD=int(LOW,HIGH[,step=K]), FIELD=choice(V1,V2,...) or FIELD=V1,V2,... (a grid "
            "axis), with a config field as FIELD (e.g. optimizer.learning_rate), entries "
            "separated by ';' or lines")
KINDS = ("loguniform", "uniform", "int", "choice")


@dataclasses.dataclass(frozen=True)
class Param:
  """One varying config field. `values` (text, as typed) for choices and grid axes."""
  key: str
  kind: str  # "loguniform", "uniform", "int", "choice" or "grid"
  low: float = 0.0
  high: float = 0.0
  step: int = 1
  values: tuple[str, ...] = ()

  @property
  def is_range(self) -> bool:
    return self.kind in ("loguniform", "uniform", "int")

  def grid_values(self) -> tuple | None:
    """The values a grid walks through (ints for int ranges); None for a continuous range."""
    if self.kind == "int":
      return tuple(range(int(self.low), int(self.high) + 1, self.step))
    return None if self.is_range else self.values

  def describe(self) -> str:
    if self.kind == "grid":
      return f"{self.key}={','.join(self.values)}"
    if self.kind == "choice":
      return f"{self.key}=choice({','.join(self.values)})"
    step = f",step={self.step}" if self.kind == "int" and self.step != 1 else ""
    return f"{self.key}={self.kind}({_number(self.low)},{_number(self.high)}{step})"


def split_top_level(text: str, separators: str) -> list[str]:
  """Splits at `separators` outside parentheses and brackets: '(8, 16),(32, 64)' -> 2 parts."""
  parts, depth, current = [], 0, []
  for char in text:
    if char in "([":
      depth += 1
    elif char in ")]":
      depth = max(depth - 1, 0)
    if char in separators and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(char)
  parts.append("".join(current))
  return parts


def parse(text: str, source: str = "--space") -> list[Param]:
  """'a=loguniform(1e-4,1e-2);b=1,2' (or one entry per line, # comments) -> [Param]."""
  params = []
  lines = [line.split("#", 1)[0] for line in text.splitlines()]
  for entry in split_top_level("\n".join(lines), ";\n"):
    entry = entry.strip()
    if entry:
      params.append(_parse_entry(entry, source))
  keys = [param.key for param in params]
  for key in keys:
    if keys.count(key) > 1:
      raise UserError(f"{source}: {key} is given twice; give it one entry.")
  if not params:
    raise UserError(f"{source} names no field. {ACCEPTED}; e.g. "
                    "--space='optimizer.learning_rate=loguniform(1e-4,3e-2)'.")
  return params


def _parse_entry(entry: str, source: str) -> Param:
  key, equals, spec = entry.partition("=")
  key = key.strip().removeprefix("--config.").removeprefix("config.")
  spec = spec.strip()
  if not equals or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not spec:
    raise UserError(f"{source}: {entry!r} is not a search-space entry. {ACCEPTED}.")
  if spec.count("(") != spec.count(")") or spec.count("[") != spec.count("]"):
    raise UserError(f"{source}: {entry!r} has unbalanced parentheses. {ACCEPTED}.")
  call = re.fullmatch(r"(\w+)\((.*)\)", spec, re.DOTALL)
  if call and call.group(1) in KINDS:
    kind, inside = call.group(1), call.group(2)
    arguments = [a.strip() for a in split_top_level(inside, ",")]
    if not all(arguments):
      raise UserError(f"{source}: {entry!r} has an empty value. {ACCEPTED}.")
    if kind == "choice":
      return Param(key, "choice", values=tuple(arguments))
    return _parse_range(key, kind, arguments, entry, source)
  if call and not spec.startswith("("):
    raise UserError(f"{source}: {entry!r}: {call.group(1)}(...) is not a kind of search "
                    f"space; kinds: {', '.join(KINDS)}. {ACCEPTED}.")
  values = tuple(v.strip() for v in split_top_level(spec, ","))
  if not all(values):
    raise UserError(f"{source}: {entry!r} has an empty value. {ACCEPTED}.")
  return Param(key, "grid", values=values)


def _parse_range(key: str, kind: str, arguments: list[str], entry: str, source: str) -> Param:
  step = 1
  if kind == "int" and len(arguments) == 3 and arguments[2].replace(" ", "").startswith("step="):
    step_text = arguments.pop().split("=", 1)[1].strip()
    if not re.fullmatch(r"\d+", step_text) or int(step_text) < 1:
      raise UserError(f"{source}: {entry!r}: step must be a positive integer.")
    step = int(step_text)
  if len(arguments) != 2:
    raise UserError(f"{source}: {entry!r}: {kind}() takes LOW,HIGH"
                    f"{'[,step=K]' if kind == 'int' else ''}. {ACCEPTED}.")
  try:
    if kind == "int":
      low, high = (int(a) for a in arguments)
    else:
      low, high = (float(a) for a in arguments)
  except ValueError:
    raise UserError(f"{source}: {entry!r}: the bounds of {kind}() must be "
                    f"{'integers' if kind == 'int' else 'numbers'}.") from None
  if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
    raise UserError(f"{source}: {entry!r}: LOW must be below HIGH (both finite).")
  if kind == "loguniform" and low <= 0:
    raise UserError(f"{source}: {entry!r}: loguniform needs LOW > 0 (a log scale).")
  return Param(key, kind, low=low, high=high, step=step)


def _number(value: float) -> str:
  return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def probe_values(param: Param) -> list[str]:
  """Values that prove a parameter: every choice, or both ends of a range."""
  if param.kind in ("choice", "grid"):
    return list(param.values)
  if param.kind == "int":
    return [str(int(param.low)), str(int(param.high) - (int(param.high) - int(param.low))
                                     % param.step)]
  return [repr(param.low), repr(param.high)]


def check(params: list[Param], config_file: str, fixed: list[str]) -> None:
  """Every value the space can give is accepted by the config (UserError otherwise).

  `fixed` are the --config.FIELD=VALUE flags every trial gets. A refused value is
  reported with the entry it came from, in one line.
  """
  from research.config import command_line, config_validation  # JAX: only where a space is checked

  base = command_line.parse_config(fixed, config_file)
  config_validation.validate(base)  # the settings every trial shares
  for param in params:
    if not _is_field(base, param.key):
      try:  # parse_config names the fields that exist and the nearest one
        command_line.parse_config([*fixed, f"--config.{param.key}={probe_values(param)[0]}"],
                                  config_file)
        reason = "it is not a config field"
      except UserError as e:
        reason = str(e).splitlines()[0].split(": ", 1)[-1]
      raise UserError(f"Search space {param.describe()}: {param.key} is not a field of "
                      f"{config_file}: {reason}") from None
    for value in probe_values(param):
      try:
        config = command_line.parse_config([*fixed, f"--config.{param.key}={value}"],
                                           config_file)
        config_validation.validate(config)
      except UserError as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"Search space {param.describe()}: the value {value} is refused: "
                        f"{reason}") from None


def _is_field(config, key: str) -> bool:
  import ml_collections

  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, ml_collections.ConfigDict)


def grid_points(params: list[Param]) -> list[dict]:
  """The Cartesian product (in order) of a space whose every entry has finite values."""
  continuous = [param.describe() for param in params if param.grid_values() is None]
  if continuous:
    raise UserError(f"--search=grid needs finite values, but {', '.join(continuous)} is a "
                    "continuous range: give its values (FIELD=V1,V2 or choice(...)), or use "
                    "--search=random or --search=tpe.")
  keys = [param.key for param in params]
  return [dict(zip(keys, values))
          for values in itertools.product(*(param.grid_values() for param in params))]


def distributions(params: list[Param]) -> dict:
  """Optuna distributions of the space (choices and grid axes as categorical text)."""
  import optuna

  found = {}
  for param in params:
    if param.kind == "loguniform":
      found[param.key] = optuna.distributions.FloatDistribution(param.low, param.high, log=True)
    elif param.kind == "uniform":
      found[param.key] = optuna.distributions.FloatDistribution(param.low, param.high)
    elif param.kind == "int":
      found[param.key] = optuna.distributions.IntDistribution(int(param.low), int(param.high),
                                                              step=param.step)
    else:
      found[param.key] = optuna.distributions.CategoricalDistribution(param.values)
  return found

