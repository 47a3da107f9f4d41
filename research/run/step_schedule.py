"""The run's steps, resolved from the config once the data's size is known.

`resolve(config, num_train_examples)` says how many steps the run has and when the
host acts (log, evaluate, checkpoint): every duration in one vocabulary, and
`is_time(step, every)` decides every periodic action. `microbatch_count` splits
each step's batch; `check_eval_batch_size` bounds the eval batch by its split.
The training loop (research/run/train.py) and the benchmarks read these; nothing
here reads data or builds a model.
"""

import dataclasses

import jax

from research import knobs
from research.errors import require

MAX_STEPS = knobs.MAX_INT32  # TrainState.step is an int32


@dataclasses.dataclass(frozen=True)
class Schedule:
  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch

  @property
  def max_chunk(self) -> int:
    """The most steps between two stops: the rows of the one compiled train loop."""
    return min([self.total_steps] + [every for every in (
        self.log_every, self.eval_every, self.checkpoint_every) if every > 0])

  def next_stop(self, step: int) -> int:
    """The next step at which the host must act (log, eval, checkpoint, end).

    Stops depend on the step alone, so a resumed run compiles and runs exactly
    the same chunks of steps as an uninterrupted one.
    """
    stop = self.total_steps
    for every in (self.log_every, self.eval_every, self.checkpoint_every):
      if every > 0:
        stop = min(stop, (step // every + 1) * every)
    return stop


def is_time(step: int, every: int) -> bool:
  return every > 0 and step > 0 and step % every == 0


def resolve(config, num_train_examples: int) -> Schedule:
  """The run's Schedule: `config.num_train_steps`, else `num_epochs` of full batches."""
  steps_per_epoch = num_train_examples // config.batch_size
  require(steps_per_epoch > 0, "batch_size", config.batch_size,
          f"at most the {num_train_examples} training examples")
  total = config.num_train_steps or int(round(config.num_epochs * steps_per_epoch))
  require(total <= MAX_STEPS, "num_epochs", config.num_epochs,
          f"at most {MAX_STEPS // steps_per_epoch} epochs ({MAX_STEPS} steps) at this batch size")
  return Schedule(
      steps_per_epoch=steps_per_epoch,
      total_steps=total,
      log_every=config.log_every_steps,
      eval_every=config.eval_every_steps or steps_per_epoch,
      checkpoint_every=config.checkpoint_every_steps,
  )


def microbatch_count(config) -> int:
  """How many micro-batches each step's batch is split into (config.microbatch_size)."""
  per_device = config.batch_size // jax.device_count()
  size = config.microbatch_size
  if size == 0 or size >= per_device:
    return 1
  require(size > 0 and per_device % size == 0, "microbatch_size", size,
          f"0 (no split) or a divisor of the per-device batch {per_device}")
  return per_device // size


def check_eval_batch_size(config, num_eval_examples: int) -> None:
  """A batch larger than the whole eval split only pads with zeros. Both are rounded up
  to a multiple of the device count (as `mesh.rounded_to_devices` rounds the batch), so
  any size up to the split's is accepted on every device count."""
  devices = jax.device_count()
  largest = -(-num_eval_examples // devices) * devices
  require(config.eval_batch_size <= largest, "eval_batch_size", config.eval_batch_size,
          f"at most {largest} (the eval split has {num_eval_examples} examples)")
