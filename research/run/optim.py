"""Optimizers and learning-rate schedules, built from optax by name.

`build_optimizer(config.optimizer, config.schedule, ...)` returns one optax
transformation:

  clip by global norm (optimizer.grad_clip_norm > 0)
  -> the optimizer named by optimizer.name, with its learning rate following
     the schedule named by schedule.name
  -> weight decay on kernels only (never biases or normalization scales)
  all wrapped in optax.MultiSteps when optimizer.grad_accum_steps > 1, so the
  gradients of k micro-batches are averaged into one update.

Weight decay: for `sgd` and `momentum` it is added to the gradient before the
momentum buffer (the convention of the classic ResNet recipes, so their 5e-4
and 1e-4 mean what the papers mean); for every other optimizer it is decoupled
(AdamW-style: the update gains -learning_rate(t) * weight_decay * param).

`adam` is optax's Adam (epsilon added to the bias-corrected sqrt(v)); `adam_keras`
is Keras's form of the same method (epsilon added to the uncorrected sqrt(v), the
bias correction folded into the step size), which the seed recipe uses to be the
Keras tutorial exactly: see `scale_by_keras_adam`.

Durations of schedules are in optimizer updates; `*_epochs` fields convert with
the run's steps per epoch. With gradient accumulation one update spans k steps.
"""

import dataclasses
import functools
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from research import knobs
from research.errors import UserError

# Fields of config.optimizer that every optimizer takes; the rest are the optimizer's
# own knobs, declared per entry below (their defaults: the optax constructor's).
COMMON = {
    "learning_rate": knobs.number(1e-3, "peak learning rate", above=0.0),
    "weight_decay": knobs.number(0.0, "on kernels only (0 = off)"),
    "grad_clip_norm": knobs.number(0.0, "clip the global gradient norm (0 = off)"),
    "grad_accum_steps": knobs.integer(1, "one update per this many batches", low=1),
}
COMMON_FIELDS = ("name", *COMMON)


@dataclasses.dataclass(frozen=True)
class Entry:
  constructor: Callable  # (learning_rate, **knobs) -> GradientTransformation
  knobs: dict  # knob name -> knobs.Field (default: the constructor's own)
  # "coupled": added to the gradient first; "native": the constructor's own
  # weight_decay/mask arguments; "decoupled": -lr * wd * param added after.
  weight_decay: str


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-7) -> optax.GradientTransformation:
  """Keras's Adam direction: m * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps).

  optax.scale_by_adam divides the bias-corrected moments, m_hat / (sqrt(v_hat) + eps),
  and no choice of its eps or eps_root moves eps outside the correction: Keras adds
  epsilon to sqrt(v) itself and puts both corrections into the step size
  (keras/src/optimizers/adam.py, `alpha = lr * sqrt(1 - beta_2_power) / (1 -
  beta_1_power)`). The moments are optax's own (optax.tree.update_moment*, in optax's
  ScaleByAdamState, so the state has Adam's layout); only the last line differs.
  """
  adam_state = optax.scale_by_adam(b1, b2)  # its init: count, mu, nu at zero

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    # An integer power (repeated squaring): exp(t * log(b)) would cost 1 - b^t digits.
    step_factor = jnp.sqrt(1 - jnp.float32(b2) ** count) / (1 - jnp.float32(b1) ** count)
    direction = jax.tree.map(lambda m, v: step_factor * m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(adam_state.init, update_fn)


def adam_keras(learning_rate, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-7) -> optax.GradientTransformation:
  """Keras's Adam (tf.keras / Keras 3 defaults), structured as optax.adam is."""
  return optax.chain(scale_by_keras_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))


_MOMENTUM = knobs.number(knobs.OWN, "momentum (None = off)", optional=True, **knobs.FRACTION)
_ADAM = {"b1": knobs.number(knobs.OWN, "first-moment decay", **knobs.FRACTION),
         "b2": knobs.number(knobs.OWN, "second-moment decay", **knobs.FRACTION),
         "eps": knobs.number(knobs.OWN, "added to the denominator", high=1.0)}

OPTIMIZERS = {
    "sgd": Entry(optax.sgd, {}, "coupled"),
    "momentum": Entry(functools.partial(optax.sgd, momentum=0.9), {
        "momentum": _MOMENTUM, "nesterov": knobs.flag(knobs.OWN, "Nesterov momentum")},
        "coupled"),
    "adam": Entry(optax.adam, _ADAM, "decoupled"),
    "adamw": Entry(optax.adamw, _ADAM, "native"),
    "lamb": Entry(optax.lamb, _ADAM, "native"),
    "lion": Entry(optax.lion, {k: _ADAM[k] for k in ("b1", "b2")}, "native"),
    "rmsprop": Entry(optax.rmsprop, {
        "decay": knobs.number(knobs.OWN, "squared-gradient decay", **knobs.FRACTION),
        "eps": _ADAM["eps"], "momentum": _MOMENTUM,
        "centered": knobs.flag(knobs.OWN, "centered RMSprop")}, "decoupled"),
    "adafactor": Entry(optax.adafactor, {
        "decay_rate": knobs.number(knobs.OWN, "second-moment decay rate", high=1.0),
        "momentum": _MOMENTUM,
        "clipping_threshold": knobs.number(knobs.OWN, "update clipping", optional=True),
        "multiply_by_parameter_scale": knobs.flag(knobs.OWN, "relative step size")},
        "decoupled"),
    "adam_keras": Entry(adam_keras, _ADAM, "decoupled"),
}


def defaults(name: str) -> dict:
  """The knobs of optimizer `name` with their default values (for recipes)."""
  entry = _lookup(name)
  constructor = entry.constructor
  preset = dict(constructor.keywords) if isinstance(constructor, functools.partial) else {}
  function = constructor.func if isinstance(constructor, functools.partial) else constructor
  parameters = inspect.signature(function).parameters
  return {knob: preset.get(knob, parameters[knob].default) for knob in entry.knobs}


def fields(name: str) -> dict:
  """{knob: knobs.Field} of optimizer `name`, with the constructor's own defaults."""
  own = defaults(name)
  return {knob: knobs.with_default(field, own[knob]) for knob, field in _lookup(name).knobs.items()}


def _lookup(name: str) -> Entry:
  if not isinstance(name, str) or name not in OPTIMIZERS:
    raise UserError(f"optimizer.name={name!r} is unknown. Known optimizers: "
                    f"{', '.join(OPTIMIZERS)}.")
  return OPTIMIZERS[name]


def decay_mask(params):
  """True for the leaves weight decay applies to: kernels, not biases or norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _non_negative(value) -> bool:
  """A finite number >= 0 (NaN and infinity would only fail later, in int())."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0)


def _duration(config, field: str, steps_per_epoch: float) -> int:
  """`field_steps` if > 0, else `field_epochs` converted; both set is a mistake."""
  steps, epochs = config[f"{field}_steps"], config[f"{field}_epochs"]
  for unit, value in (("steps", steps), ("epochs", epochs)):
    if not _non_negative(value):
      raise UserError(f"schedule.{field}_{unit}={value!r} is not accepted: 0 (none) or a "
                      f"positive finite number of {unit}.")
  if steps and epochs:
    raise UserError(f"schedule.{field}_steps={steps} and schedule.{field}_epochs={epochs} are "
                    f"both set; set only one of them.")
  return int(steps or round(epochs * steps_per_epoch))


def _numbers(schedule_config, field: str, example: str) -> tuple:
  """schedule.`field` as a tuple of non-negative numbers, or a clear error."""
  value = schedule_config[field]
  if not (isinstance(value, (tuple, list)) and all(_non_negative(v) for v in value)):
    raise UserError(f"schedule.{field}={value!r} is not accepted: a tuple of non-negative "
                    f"numbers (finite), e.g. --config.schedule.{field}='{example}' (or '()' for none).")
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class Span:
  """What a schedule entry is built for: `total_steps` updates, the first `warmup` of
  them a linear ramp (added by `build_schedule` unless the entry makes its own)."""
  learning_rate: float
  total_steps: int
  warmup: int
  steps_per_epoch: float


@dataclasses.dataclass(frozen=True)
class Schedule:
  # (schedule config, Span) -> a float or an optax schedule of the updates after the warmup
  # (of all updates when `own_warmup`)
  make: Callable
  knobs: dict  # knob name -> knobs.Field: schedule.NAME fields this schedule reads
  own_warmup: bool = False
  needs_warmup: bool = False


def _constant(config, span: Span):
  del config
  return span.learning_rate


def _cosine(config, span: Span):
  return optax.cosine_decay_schedule(span.learning_rate, span.total_steps - span.warmup,
                                     alpha=config.end_learning_rate_factor)


def _piecewise(config, span: Span):
  boundaries = [int(round(b * span.steps_per_epoch))
                for b in _numbers(config, "boundaries_epochs", "(30, 60, 80)")]
  boundaries += [int(b) for b in _numbers(config, "boundaries_steps", "(1000, 2000)")]
  if not boundaries:
    raise UserError("schedule.name='piecewise' needs decay points: set schedule.boundaries_epochs "
                    "(e.g. '(30, 60, 80)') or schedule.boundaries_steps.")
  return optax.piecewise_constant_schedule(
      span.learning_rate, {b - span.warmup: config.decay_factor for b in sorted(boundaries)})


def _one_cycle(config, span: Span):
  del config  # its own warmup: the rising part, 30% unless warmup is set
  return optax.cosine_onecycle_schedule(
      span.total_steps, span.learning_rate,
      pct_start=span.warmup / span.total_steps if span.warmup else 0.3)


# Fields of config.schedule that every schedule takes.
SCHEDULE_COMMON = {
    "warmup_steps": knobs.integer(0, "linear warmup length in updates (0 = none)"),
    "warmup_epochs": knobs.number(0.0, "linear warmup length in epochs (0 = none)",
                                  high=knobs.MAX_INT32),
}
_END_FACTOR = {"end_learning_rate_factor": knobs.number(
    0.0, "cosine: final / peak learning rate", high=1.0)}

SCHEDULES = {
    "constant": Schedule(_constant, {}),
    "cosine": Schedule(_cosine, _END_FACTOR),
    "warmup_cosine": Schedule(_cosine, _END_FACTOR, needs_warmup=True),
    "piecewise": Schedule(_piecewise, {
        "boundaries_epochs": knobs.numbers((), "piecewise: decay points in epochs"),
        "boundaries_steps": knobs.ints((), "piecewise: decay points in updates"),
        "decay_factor": knobs.number(0.1, "piecewise: learning-rate factor at each boundary",
                                     high=1.0)}),
    "one_cycle": Schedule(_one_cycle, {}, own_warmup=True),
}


def schedule_fields() -> dict:
  """{field: knobs.Field} of config.schedule: the common ones and every schedule's knobs.

  The schedule fields share one group, so a knob name means one thing: two schedules
  that read `decay_rate` must share one declaration (fails on import otherwise)."""
  found = dict(SCHEDULE_COMMON)
  for name, entry in SCHEDULES.items():
    for knob, field in entry.knobs.items():
      if knob in found and found[knob] != field:
        raise ValueError(f"schedule knob {knob!r} of {name!r} is declared differently by "
                         "another schedule: give it its own name (or share the declaration).")
      found[knob] = field
  return found


schedule_fields()  # two schedules declaring one knob name differently fail here, on import


def schedule_defaults(name: str = "constant") -> dict:
  """config.schedule with every field at its declared default (recipes start from this)."""
  return {"name": name, **{knob: field.default for knob, field in schedule_fields().items()}}


def build_schedule(schedule_config, learning_rate: float, steps_per_epoch: float,
                   total_steps: int):
  """A float (constant, no warmup) or an optax schedule over `total_steps` updates."""
  name = schedule_config.name
  if not isinstance(name, str) or name not in SCHEDULES:
    raise UserError(f"schedule.name={name!r} is unknown. Known schedules: {', '.join(SCHEDULES)}.")
  entry = SCHEDULES[name]
  declared = schedule_fields()
  for knob, value in schedule_config.items():  # another schedule's knob, set, is a mistake
    if knob in declared and knob not in SCHEDULE_COMMON and knob not in entry.knobs and (
        value != declared[knob].default and not (value == [] and declared[knob].default == ())):
      users = [other for other, e in SCHEDULES.items() if knob in e.knobs]
      raise UserError(f"schedule.{knob}={value!r} applies to the {', '.join(users)} schedule "
                      f"only, not {name!r}; leave it at {declared[knob].default!r}.")
  warmup = _duration(schedule_config, "warmup", steps_per_epoch)
  if entry.needs_warmup and not warmup:
    raise UserError(f"schedule.name={name!r} needs schedule.warmup_epochs or "
                    "schedule.warmup_steps > 0 (or use 'cosine').")
  if warmup >= total_steps:
    raise UserError(f"The warmup ({warmup} updates) is not shorter than the run ({total_steps} "
                    "updates); shorten schedule.warmup_* or train longer.")
  main = entry.make(schedule_config, Span(learning_rate, total_steps, warmup, steps_per_epoch))
  if entry.own_warmup or not warmup:
    return main
  ramp = optax.linear_schedule(0.0, learning_rate, warmup)
  return optax.join_schedules([ramp, main if callable(main) else optax.constant_schedule(main)],
                              [warmup])


def check(optimizer_config, schedule_config) -> None:
  """Fails on unknown names, inapplicable knobs or settings `build_optimizer` refuses, and
  on a schedule's knobs (checked at any run length); cheap and builds no optimizer, so it
  runs before any data is read."""
  check_knobs(optimizer_config)
  _common_settings(optimizer_config)
  if schedule_config is not None:
    build_schedule(schedule_config, optimizer_config.learning_rate, steps_per_epoch=1,
                   total_steps=1 << 30)


def check_knobs(optimizer_config) -> None:
  """Fails on an unknown optimizer name, or a knob it does not take (naming its knobs)."""
  _check_knobs(optimizer_config, _lookup(optimizer_config.name))


def _check_knobs(optimizer_config, entry: Entry) -> dict:
  settings = {k: v for k, v in optimizer_config.items() if k not in COMMON_FIELDS}
  unknown = sorted(set(settings) - set(entry.knobs))
  if unknown:
    raise UserError(f"optimizer.{unknown[0]} does not apply to optimizer "
                    f"{optimizer_config.name!r}; its knobs are: {', '.join(entry.knobs) or '(none)'}"
                    f", plus {', '.join(COMMON_FIELDS[1:])}.")
  return settings


def _common_settings(optimizer_config) -> tuple[int, float, float]:
  """(grad_accum_steps, weight_decay, grad_clip_norm), refused when out of range."""
  accumulate = int(optimizer_config.get("grad_accum_steps", 1))
  if accumulate < 1:
    raise UserError(f"optimizer.grad_accum_steps={accumulate} is not accepted: a positive integer "
                    "(1 = no accumulation).")
  weight_decay = float(optimizer_config.get("weight_decay", 0.0))
  clip_norm = float(optimizer_config.get("grad_clip_norm", 0.0))
  if weight_decay < 0 or clip_norm < 0:
    raise UserError("optimizer.weight_decay and optimizer.grad_clip_norm must be >= 0 (0 = off).")
  return accumulate, weight_decay, clip_norm


def build_optimizer(optimizer_config, schedule_config=None, *, steps_per_epoch: float = 1,
                    total_steps: int = 1) -> optax.GradientTransformation:
  """The whole update rule (see the module docstring); fails early on bad settings.

  `steps_per_epoch` and `total_steps` count train steps (micro-batches); with
  gradient accumulation the schedule runs over total_steps // k updates.
  """
  name = optimizer_config.name
  entry = _lookup(name)
  settings = _check_knobs(optimizer_config, entry)
  accumulate, weight_decay, clip_norm = _common_settings(optimizer_config)

  learning_rate = optimizer_config.learning_rate
  if schedule_config is not None:
    learning_rate = build_schedule(schedule_config, learning_rate, steps_per_epoch / accumulate,
                                   max(1, total_steps // accumulate))

  if entry.weight_decay == "native":
    settings.update(weight_decay=weight_decay, mask=decay_mask)
  try:
    optimizer = entry.constructor(learning_rate, **settings)
  except (TypeError, ValueError) as e:
    raise UserError(f"optimizer {name!r} does not accept these settings {settings}: {e}") from e

  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  if weight_decay and entry.weight_decay == "coupled":
    parts += [optax.add_decayed_weights(weight_decay, decay_mask), optimizer]
  elif weight_decay and entry.weight_decay == "decoupled":
    rate = ((lambda count: -learning_rate(count) * weight_decay) if callable(learning_rate)
            else -learning_rate * weight_decay)
    parts += [optimizer, optax.add_decayed_weights(rate, decay_mask)]
  else:
    parts.append(optimizer)
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx
