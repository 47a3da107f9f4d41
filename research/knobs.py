"""A config field's declaration: its kind, the values it accepts, its default and meaning.

Declared next to the code that reads it: each model (research/models/), optimizer and
schedule (research/run/optim.py) and metric (research/metrics.py) lists its own knobs as
`Field`s, and research/config/config_schema.py, the command-line help, validation and the
study's space checks are built from those declarations. A registry knob's default is
the code's own (the module field's or the optax argument's default): `OWN` stands for it
in the declaration, and the registry fills it in, so it is never written twice.
"""

import dataclasses
import math
from typing import Any

MAX_INT32 = 2**31 - 1  # step counters and seeds are int32 on the devices
OWN = "(the code's own default)"  # filled in by the registry from the code


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field. `kind` is "int", "number", "bool", "text", "choice", "ints" or
  "numbers" (tuples); numbers lie in [low, high], with `below` and `above` as exclusive
  bounds where set."""

  kind: str
  default: Any
  meaning: str
  low: float | None = None
  high: float | None = None
  below: float | None = None
  above: float | None = None  # exclusive lower bound (instead of `low`)
  choices: tuple = ()
  optional: bool = False  # None accepted (e.g. "no momentum")

  def accepted(self) -> str:
    """What the field accepts, in words."""
    if self.kind == "bool":
      text = "True or False"
    elif self.kind == "text":
      text = "text"
    elif self.kind == "choice":
      text = "one of " + ", ".join(repr(choice) for choice in self.choices)
    elif self.kind in ("int", "ints"):
      bounds = f"from {_show(self.low)} to {_show(self.high)}"
      text = f"an integer {bounds}" if self.kind == "int" else f"a tuple of integers, each {bounds}"
    else:
      text = ("a finite number " if self.kind == "number"
              else "a tuple of finite numbers, each ") + self._interval()
    return text + (", or None" if self.optional else "")

  def _interval(self) -> str:
    opening = f"[{_show(self.low)}" if self.low is not None else f"({_show(self.above)}"
    if self.high is None and self.below is None:
      return ">= " + opening[1:] if opening[0] == "[" else "> " + opening[1:]
    closing = f"{_show(self.high)}]" if self.high is not None else f"{_show(self.below)})"
    return f"in {opening}, {closing}"

  def problem(self, value) -> str | None:
    """None when `value` is accepted, else what is wrong, in a few words."""
    if value is None:
      return None if self.optional else "None is not a value here"
    if self.kind == "bool":
      return None if isinstance(value, bool) else "not True or False"
    if self.kind == "text":
      return None if isinstance(value, str) else "not text"
    if self.kind == "choice":
      return None if _hashable(value) and value in self.choices else "not one of the choices"
    if self.kind in ("ints", "numbers"):
      if not isinstance(value, (tuple, list)):
        return "not a tuple"
      for item in value:
        problem = self._number_problem(item, integer=self.kind == "ints")
        if problem:
          return f"an element {problem}"
      return None
    return self._number_problem(value, integer=self.kind == "int")

  def _number_problem(self, value, integer: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return "is not a number"
    if integer and not isinstance(value, int):
      return "is not an integer"
    if not math.isfinite(value):
      return "is not finite"
    if ((self.low is not None and value < self.low) or (self.high is not None and value > self.high)
        or (self.below is not None and value >= self.below)
        or (self.above is not None and value <= self.above)):
      return "is out of range"
    return None


def integer(default, meaning, low=0, high=MAX_INT32):
  return Field("int", default, meaning, low=low, high=high)


def number(default, meaning, low=0.0, high=None, below=None, above=None, optional=False):
  if above is not None:
    low = None
  return Field("number", default, meaning, low=low, high=high, below=below, above=above,
               optional=optional)


def flag(default, meaning):
  return Field("bool", default, meaning)


def text(default, meaning):
  return Field("text", default, meaning)


def choice(default, meaning, choices):
  return Field("choice", default, meaning, choices=tuple(choices))


def _show(bound) -> str:
  return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _hashable(value) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


def ints(default, meaning, low=0, high=MAX_INT32):
  return Field("ints", default, meaning, low=low, high=high)


def numbers(default, meaning, low=0.0, high=MAX_INT32):
  return Field("numbers", default, meaning, low=low, high=high)


def with_default(field: Field, default) -> Field:
  """`field` with the code's own default in place of `OWN`."""
  return dataclasses.replace(field, default=default) if field.default == OWN else field


FRACTION = dict(low=0.0, below=1.0)
