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

from research.errors import UserError

# Fields of config.optimizer that every optimizer takes; the rest are the
# optimizer's own knobs, listed per entry below.
COMMON_FIELDS = ("name", "learning_rate", "weight_decay", "grad_clip_norm", "grad_accum_steps")


@dataclasses.dataclass(frozen=True)
class Entry:
  constructor: Callable  # (learning_rate, **knobs) -> GradientTransformation
  knobs: tuple[str, ...]
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


OPTIMIZERS = {
    "sgd": Entry(optax.sgd, (), "coupled"),
    "momentum": Entry(functools.partial(optax.sgd, momentum=0.9), ("momentum", "nesterov"),
                      "coupled"),
    "adam": Entry(optax.adam, ("b1", "b2", "eps"), "decoupled"),
    "adamw": Entry(optax.adamw, ("b1", "b2", "eps"), "native"),
    "lamb": Entry(optax.lamb, ("b1", "b2", "eps"), "native"),
    "lion": Entry(optax.lion, ("b1", "b2"), "native"),
    "rmsprop": Entry(optax.rmsprop, ("decay", "eps", "momentum", "centered"), "decoupled"),
    "adafactor": Entry(optax.adafactor, ("decay_rate", "momentum", "clipping_threshold",
                                         "multiply_by_parameter_scale"), "decoupled"),
    "adam_keras": Entry(adam_keras, ("b1", "b2", "eps"), "decoupled"),
}

SCHEDULES = ("constant", "cosine", "warmup_cosine", "piecewise", "one_cycle")


def defaults(name: str) -> dict:
  """The knobs of optimizer `name` with their default values (for recipes)."""
  entry = _lookup(name)
  constructor = entry.constructor
  preset = dict(constructor.keywords) if isinstance(constructor, functools.partial) else {}
  function = constructor.func if isinstance(constructor, functools.partial) else constructor
  parameters = inspect.signature(function).parameters
  return {knob: preset.get(knob, parameters[knob].default) for knob in entry.knobs}


def _lookup(name: str) -> Entry:
  if name not in OPTIMIZERS:
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


def build_schedule(schedule_config, learning_rate: float, steps_per_epoch: float,
                   total_steps: int):
  """A float (constant, no warmup) or an optax schedule over `total_steps` updates."""
  name = schedule_config.name
  if name not in SCHEDULES:
    raise UserError(f"schedule.name={name!r} is unknown. Known schedules: {', '.join(SCHEDULES)}.")
  warmup = _duration(schedule_config, "warmup", steps_per_epoch)
  boundaries = [int(round(b * steps_per_epoch))
                for b in _numbers(schedule_config, "boundaries_epochs", "(30, 60, 80)")]
  boundaries += [int(b) for b in _numbers(schedule_config, "boundaries_steps", "(1000, 2000)")]
  if boundaries and name != "piecewise":
    raise UserError(f"schedule.boundaries_* apply to the piecewise schedule only, not {name!r}.")
  if name == "piecewise" and not boundaries:
    raise UserError("schedule.name='piecewise' needs decay points: set schedule.boundaries_epochs "
                    "(e.g. '(30, 60, 80)') or schedule.boundaries_steps.")
  if name == "warmup_cosine" and not warmup:
    raise UserError("schedule.name='warmup_cosine' needs schedule.warmup_epochs or "
                    "schedule.warmup_steps > 0 (or use 'cosine').")
  if warmup >= total_steps:
    raise UserError(f"The warmup ({warmup} updates) is not shorter than the run ({total_steps} "
                    "updates); shorten schedule.warmup_* or train longer.")

  if name == "one_cycle":  # its own warmup: the rising part, 30% unless warmup is set
    return optax.cosine_onecycle_schedule(
        total_steps, learning_rate, pct_start=warmup / total_steps if warmup else 0.3)
  if name == "constant":
    main = learning_rate
  elif name in ("cosine", "warmup_cosine"):
    main = optax.cosine_decay_schedule(learning_rate, total_steps - warmup,
                                       alpha=schedule_config.end_learning_rate_factor)
  else:  # piecewise
    main = optax.piecewise_constant_schedule(
        learning_rate, {b - warmup: schedule_config.decay_factor for b in sorted(boundaries)})
  if not warmup:
    return main
  ramp = optax.linear_schedule(0.0, learning_rate, warmup)
  return optax.join_schedules([ramp, main if callable(main) else optax.constant_schedule(main)],
                              [warmup])


def check(optimizer_config, schedule_config) -> None:
  """Fails on unknown names or inapplicable knobs; cheap, so it runs before any data is read."""
  entry = _lookup(optimizer_config.name)
  _check_knobs(optimizer_config, entry)
  build_schedule(schedule_config, optimizer_config.learning_rate, steps_per_epoch=1,
                 total_steps=1 << 30)


def _check_knobs(optimizer_config, entry: Entry) -> dict:
  knobs = {k: v for k, v in optimizer_config.items() if k not in COMMON_FIELDS}
  unknown = sorted(set(knobs) - set(entry.knobs))
  if unknown:
    raise UserError(f"optimizer.{unknown[0]} does not apply to optimizer "
                    f"{optimizer_config.name!r}; its knobs are: {', '.join(entry.knobs) or '(none)'}"
                    f", plus {', '.join(COMMON_FIELDS[1:])}.")
  return knobs


def build_optimizer(optimizer_config, schedule_config=None, *, steps_per_epoch: float = 1,
                    total_steps: int = 1) -> optax.GradientTransformation:
  """The whole update rule (see the module docstring); fails early on bad settings.

  `steps_per_epoch` and `total_steps` count train steps (micro-batches); with
  gradient accumulation the schedule runs over total_steps // k updates.
  """
  name = optimizer_config.name
  entry = _lookup(name)
  knobs = _check_knobs(optimizer_config, entry)
  accumulate = int(optimizer_config.get("grad_accum_steps", 1))
  if accumulate < 1:
    raise UserError(f"optimizer.grad_accum_steps={accumulate} is not accepted: a positive integer "
                    "(1 = no accumulation).")
  weight_decay = float(optimizer_config.get("weight_decay", 0.0))
  clip_norm = float(optimizer_config.get("grad_clip_norm", 0.0))
  if weight_decay < 0 or clip_norm < 0:
    raise UserError("optimizer.weight_decay and optimizer.grad_clip_norm must be >= 0 (0 = off).")

  learning_rate = optimizer_config.learning_rate
  if schedule_config is not None:
    learning_rate = build_schedule(schedule_config, learning_rate, steps_per_epoch / accumulate,
                                   max(1, total_steps // accumulate))

  if entry.weight_decay == "native":
    knobs.update(weight_decay=weight_decay, mask=decay_mask)
  try:
    optimizer = entry.constructor(learning_rate, **knobs)
  except (TypeError, ValueError) as e:
    raise UserError(f"optimizer {name!r} does not accept these settings {knobs}: {e}") from e

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
