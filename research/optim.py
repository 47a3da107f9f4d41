"""Optimizers and learning-rate schedules, built from optax by name.

`config.optimizer.name` picks a constructor from `OPTIMIZERS`;
`config.schedule.name` picks one from `SCHEDULES`. Every constructor takes the
learning rate (a float or an optax schedule) and its own knobs from the config.
"""

import optax

from research.errors import UserError

OPTIMIZERS = {
    "sgd": optax.sgd,
    "adam": optax.adam,
    "adamw": optax.adamw,
}


def build_optimizer(optimizer_config) -> optax.GradientTransformation:
  name = optimizer_config.name
  if name not in OPTIMIZERS:
    raise UserError(f"optimizer.name={name!r} is unknown. Known optimizers: "
                    f"{', '.join(sorted(OPTIMIZERS))}.")
  kwargs = {k: v for k, v in optimizer_config.items() if k not in ("name",)}
  try:
    return OPTIMIZERS[name](**kwargs)
  except TypeError as e:
    raise UserError(f"optimizer {name!r} does not accept these settings "
                    f"{sorted(kwargs)}: {e}") from e
