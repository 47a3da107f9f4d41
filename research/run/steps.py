"""Pure functions where the math is: loss, one train step, one eval step.

Everything a step needs comes in as arguments and the new state goes out, so
the same functions serve one CPU, many devices and many hosts. Per-step
randomness is `fold_in(state.rng, state.step)`: no mutable RNG, exact resume.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from research import metrics


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  model_state: Any  # non-trainable collections (e.g. BatchNorm statistics); {} if none
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so it checkpoints like any other array


def preprocess(images):
  """uint8 pixels -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, images, labels, *, apply_fn: Callable,
               tx: optax.GradientTransformation, train_input: Callable | None = None,
               label_smoothing: float = 0.0, microbatches: int = 1):
  """One optimizer step on a batch of uint8 images -> (new state, metrics).

  `train_input(images, key)` turns the uint8 batch into model input (augment,
  normalize; see augment.py); by default pixels are scaled to [0, 1].

  With `microbatches` > 1 the batch's gradient is summed over that many equal
  slices, one after another: the same gradient up to float rounding, with
  activations small enough to stay in cache (XLA's CPU convolutions slow down per
  image as the batch grows). BatchNorm then normalizes per micro-batch. Each
  micro-batch draws its own dropout masks (the step's dropout key folded with the
  micro-batch's index), as one pass over the whole batch would; augmentation
  already draws per example over the whole batch, before the split.
  """
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  inputs = (preprocess(images) if train_input is None
            else train_input(images, jax.random.fold_in(step_rng, 1)))

  def loss_fn(params, model_state, inputs, labels, dropout_key):
    variables = {"params": params, **model_state}
    logits, new_model_state = apply_fn(
        variables, inputs, train=True, rngs={"dropout": dropout_key},
        mutable=list(model_state))
    loss = cross_entropy(logits, labels, label_smoothing).mean()
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, (correct, new_model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (loss, (correct, new_model_state)), grads = grad_fn(state.params, state.model_state, inputs,
                                                        labels, step_rng)
  else:
    microbatch_keys = jax.random.fold_in(step_rng, 2)  # 1 is augmentation's

    def accumulate(carry, batch):
      loss_sum, correct_sum, grad_sum, model_state = carry
      inputs, labels, index = batch
      (loss, (correct, model_state)), grads = grad_fn(
          state.params, model_state, inputs, labels, jax.random.fold_in(microbatch_keys, index))
      return (loss_sum + loss, correct_sum + correct, jax.tree.map(jnp.add, grad_sum, grads),
              model_state), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss, correct, grads, new_model_state), _ = jax.lax.scan(
        accumulate, (jnp.float32(0), jnp.int32(0), zeros, state.model_state),
        (split_microbatches(inputs, microbatches), split_microbatches(labels, microbatches),
         jnp.arange(microbatches)))
    loss = loss / microbatches
    grads = jax.tree.map(lambda g: g / microbatches, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      model_state=new_model_state,
      opt_state=opt_state)
  metrics = {
      "loss": loss,
      "accuracy": correct / labels.shape[0],
      "grad_norm": optax.tree.norm(grads),
  }
  return new_state, metrics


def split_microbatches(x, count: int):
  """[B, ...] -> [count, B / count, ...]; every micro-batch takes an equal share of
  each device's rows, so that all devices work on every micro-batch."""
  devices = jax.device_count()
  per_device = x.shape[0] // devices
  x = x.reshape(devices, count, per_device // count, *x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(count, devices * (per_device // count), *x.shape[3:])


def eval_step(params, model_state, images, labels, mask, *, apply_fn: Callable,
              eval_input: Callable | None = None):
  """Sums over one padded batch: every registered metric's (research/metrics.py), and
  the example count."""
  inputs = preprocess(images) if eval_input is None else eval_input(images)
  logits = apply_fn({"params": params, **model_state}, inputs, train=False)
  return metrics.batch_sums(logits, labels, mask)


def _train_loop(state, num_steps, rows: int, batch, step_kwargs):
  """Runs `train_step` on batch(i) for i < num_steps in one compiled loop -> (state,
  per-step metrics [rows], zero from num_steps on).

  `num_steps` is either traced (the CPU form: one program serves every chunk length up
  to `rows`, where chunks cut short by log, eval or checkpoint stops that do not line up
  would otherwise each compile a program) or the Python int `rows` (the accelerator
  form, research/backend.py: XLA knows the trip count, so GPUs run the loop without
  copying its condition to the host every iteration)."""
  shapes = jax.eval_shape(lambda state: train_step(state, *batch(0), **step_kwargs)[1], state)
  metrics = jax.tree.map(lambda m: jnp.zeros((rows, *m.shape), m.dtype), shapes)

  def body(i, carry):
    state, metrics = carry
    state, step_metrics = train_step(state, *batch(i), **step_kwargs)
    return state, jax.tree.map(lambda all_steps, m: all_steps.at[i].set(m), metrics, step_metrics)

  return jax.lax.fori_loop(0, num_steps, body, (state, metrics))


def train_many(state, all_images, all_labels, batch_indices, num_steps=None, **step_kwargs):
  """Runs the first `num_steps` (default: all, a static trip count) rows of batch_indices
  [rows, batch] as train steps in one compiled loop, gathering each batch from the
  device-resident dataset. Returns (state, per-step metrics [rows], zero from num_steps
  on)."""
  rows = batch_indices.shape[0]

  def batch(i):
    indices = batch_indices[i]
    return all_images[indices], all_labels[indices]

  return _train_loop(state, rows if num_steps is None else num_steps, rows, batch, step_kwargs)


def train_on_batches(state, images, labels, **step_kwargs):
  """Runs len(images) train steps in one compiled loop over batches the host
  prepared (images [num_steps, batch, H, W, C] uint8, labels [num_steps, batch]):
  the streaming counterpart of `train_many`, with the same `train_step`."""
  rows = images.shape[0]
  return _train_loop(state, rows, rows, lambda i: (images[i], labels[i]), step_kwargs)


def evaluate_all(params, model_state, images, labels, mask, **step_kwargs):
  """Evaluates padded batches [num_batches, batch, ...] -> summed totals."""

  def body(totals, batch):
    sums = eval_step(params, model_state, *batch, **step_kwargs)
    return jax.tree.map(jnp.add, totals, sums), None

  shapes = jax.eval_shape(lambda: eval_step(params, model_state, images[0], labels[0], mask[0],
                                            **step_kwargs))
  zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
  totals, _ = jax.lax.scan(body, zeros, (images, labels, mask))
  return totals
