"""Optimizers, schedules, weight decay, clipping and gradient accumulation from configs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from research import models
from research.data import datasets
from research.errors import UserError
from research.run import optim, steps, train


def _optimizer_config(name, **fields):
  config = default.get_config(f"optimizer={name}")
  config.optimizer.update(fields)
  return config


def _build(config, steps_per_epoch=10, total_steps=100):
  return optim.build_optimizer(config.optimizer, config.schedule,
                               steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def _mlp():
  return models.build(ml_collections.ConfigDict({"name": "mlp", "hidden_features": (32,)}), 10)


# Every registered optimizer trains below; these need other rates than Adam's 1e-3.
_OTHER_RATES = {"sgd": 0.1, "momentum": 0.05, "lamb": 2e-2, "adafactor": 1e-2}
LEARNING_RATES = {name: _OTHER_RATES.get(name, 1e-3) for name in optim.OPTIMIZERS}


@pytest.mark.parametrize("name", sorted(LEARNING_RATES))
@pytest.mark.slow
def test_every_optimizer_trains_on_real_batches(fashion_mnist, name):
  _, train_split, _ = fashion_mnist
  config = _optimizer_config(name, learning_rate=LEARNING_RATES[name], weight_decay=1e-4,
                             grad_clip_norm=5.0)
  config.schedule.name = "warmup_cosine"
  config.schedule.warmup_steps = 5
  model, tx = _mlp(), _build(config, total_steps=40)
  state = train.create_state(model, tx, (28, 28, 1), seed=0)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=tx))
  indices = datasets.batch_indices(0, 0, 40, 64, len(train_split))
  state, metrics = run(state, train_split.images, train_split.labels, indices)
  losses = np.asarray(metrics["loss"])
  assert np.all(np.isfinite(losses))
  assert losses[-8:].mean() < 0.8 * losses[:8].mean(), losses


def test_adam_stays_optax_adam():
  tx = _build(_optimizer_config("adam"))
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}}
  grads = jax.tree.map(lambda p: p * 0.3, params)
  ours, _ = tx.update(grads, tx.init(params), params)
  reference = optax.adam(1e-3)
  expected, _ = reference.update(grads, reference.init(params), params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def _keras_adam_in_numpy(gradients, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
  """keras/src/optimizers/adam.py `update_step`, written out with its dtypes: the
  powers of beta in float32 (`ops.cast(self.beta_1, variable.dtype)`), the moment
  factors from the Python floats, float32 variables. Returns the updates it applies."""
  m = np.zeros_like(gradients[0])
  v = np.zeros_like(gradients[0])
  updates = []
  for t, g in enumerate(gradients, start=1):
    local_step = np.float32(t)
    beta_1_power = np.float32(beta_1) ** local_step
    beta_2_power = np.float32(beta_2) ** local_step
    alpha = np.float32(learning_rate) * np.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = m + (g - m) * (1 - beta_1)
    v = v + (np.square(g) - v) * (1 - beta_2)
    updates.append(-(m * alpha) / (np.sqrt(v) + epsilon))
  return updates


def test_seed_config_builds_keras_adam_which_matches_the_keras_formula():
  config = default.get_config()
  assert config.optimizer.name == "adam_keras"
  assert optim.defaults("adam_keras") == {"b1": 0.9, "b2": 0.999, "eps": 1e-7}  # Keras's
  tx = _build(config)
  rng = np.random.default_rng(0)
  # Gradients over many scales, tiny ones included: there eps's place matters most.
  gradients = [(rng.standard_normal((4, 5)) * 10.0 ** rng.integers(-9, 1, (4, 5))
                ).astype(np.float32) for _ in range(6)]
  params = {"kernel": jnp.zeros((4, 5))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected = _keras_adam_in_numpy(gradients, 1e-3)
  for step, g in enumerate(gradients):
    updates, state = update({"kernel": jnp.asarray(g)}, state, params)
    np.testing.assert_allclose(updates["kernel"], expected[step], rtol=5e-7, atol=0,
                               err_msg=f"step {step + 1}")
  # optax's Adam is another formula: far apart where the gradients are tiny.
  reference = optax.adam(1e-3, eps=1e-7)
  optax_updates, _ = reference.update({"kernel": jnp.asarray(gradients[0])},
                                      reference.init(params), params)
  assert not np.allclose(optax_updates["kernel"], expected[0], rtol=1e-3)


def _schedule(name, **fields):
  config = default.get_config().schedule
  config.name = name
  config.update(fields)
  return optim.build_schedule(config, 1.0, steps_per_epoch=10, total_steps=100)


def test_schedules_have_their_shapes():
  assert _schedule("constant") == 1.0
  cosine = _schedule("cosine", end_learning_rate_factor=0.1)
  assert float(cosine(0)) == 1.0 and float(cosine(50)) == pytest.approx(0.55)
  assert float(cosine(100)) == pytest.approx(0.1)
  warm = _schedule("warmup_cosine", warmup_epochs=2.0)  # 2 epochs = 20 steps
  assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.5)
  assert float(warm(20)) == pytest.approx(1.0) and float(warm(100)) == pytest.approx(0.0)
  piecewise = _schedule("piecewise", boundaries_epochs=(3, 6), decay_factor=0.1)
  assert [float(piecewise(s)) for s in (29, 30, 59, 60)] == pytest.approx([1, 0.1, 0.1, 0.01])
  steps_version = _schedule("piecewise", boundaries_steps=(30, 60), decay_factor=0.1)
  assert float(steps_version(45)) == pytest.approx(0.1)
  cycle = _schedule("one_cycle", warmup_steps=25)
  assert float(cycle(0)) == pytest.approx(1 / 25) and float(cycle(25)) == pytest.approx(1.0)
  assert float(cycle(100)) < 1e-4
  constant_warmup = _schedule("constant", warmup_steps=10)
  assert float(constant_warmup(5)) == pytest.approx(0.5) and float(constant_warmup(50)) == 1.0


def test_schedule_mistakes_fail_with_the_accepted_values():
  with pytest.raises(UserError, match="Known schedules: constant, cosine, warmup_cosine"):
    _schedule("linear")
  with pytest.raises(UserError, match="applies to the piecewise schedule only, not 'cosine'"):
    _schedule("cosine", boundaries_epochs=(3,))
  with pytest.raises(UserError, match="needs decay points"):
    _schedule("piecewise")
  with pytest.raises(UserError, match="needs schedule.warmup_epochs"):
    _schedule("warmup_cosine")
  with pytest.raises(UserError, match="set only one"):
    _schedule("cosine", warmup_steps=3, warmup_epochs=1.0)


def test_optimizer_mistakes_fail_with_the_valid_choices():
  with pytest.raises(UserError, match="Known optimizers: sgd, momentum, adam, adamw, lamb, lion"):
    config = _optimizer_config("adam")
    config.optimizer.name = "adagrad"
    _build(config)
  config = _optimizer_config("adam")
  config.optimizer.momentum = 0.9  # adam has no momentum knob
  with pytest.raises(UserError, match="optimizer.momentum does not apply to optimizer 'adam'; "
                     "its knobs are: b1, b2, eps"):
    _build(config)
  with pytest.raises(UserError, match="grad_accum_steps"):
    _build(_optimizer_config("sgd", grad_accum_steps=0))


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw", "lion", "rmsprop"])
def test_weight_decay_skips_biases_and_norm_scales(name):
  config = _optimizer_config(name, learning_rate=0.1, weight_decay=0.5)
  tx = _build(config)
  params = {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2))},
            "BatchNorm_0": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))},
            "Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert float(jnp.abs(updates["Conv_0"]["kernel"]).min()) > 0
  assert float(jnp.abs(updates["Dense_0"]["kernel"]).min()) > 0
  for leaf in (updates["BatchNorm_0"]["scale"], updates["BatchNorm_0"]["bias"],
               updates["Dense_0"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_sgd_weight_decay_is_the_classic_gradient_term_and_adamw_style_elsewhere():
  params = {"kernel": jnp.full((2, 2), 2.0)}
  zero = jax.tree.map(jnp.zeros_like, params)
  sgd = _build(_optimizer_config("sgd", learning_rate=0.1, weight_decay=0.5))
  updates, _ = sgd.update(zero, sgd.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0)
  adam = _build(_optimizer_config("adam", learning_rate=0.1, weight_decay=0.5))
  updates, _ = adam.update(zero, adam.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)


def test_global_norm_clipping_bounds_the_step():
  tx = _build(_optimizer_config("sgd", learning_rate=1.0, grad_clip_norm=1.0))
  params = {"a": jnp.zeros((10,)), "b": jnp.zeros((5,))}
  grads = {"a": jnp.full((10,), 3.0), "b": jnp.full((5,), -4.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.usefixtures("cheap_compiles")  # conftest.py: both sides compiled alike
@pytest.mark.parametrize("name", ["sgd", "momentum"])
@pytest.mark.slow
def test_k_micro_batches_equal_one_step_on_the_k_times_larger_batch(fashion_mnist, name):
  _, train_split, _ = fashion_mnist
  k, batch = 4, 8
  model = models.build(ml_collections.ConfigDict(
      {"name": "cnn", "conv_features": (4, 8), "dense_features": 16}), 10)
  config = _optimizer_config(name, learning_rate=0.1, weight_decay=1e-3)
  accumulated_tx = _build(_optimizer_config(name, learning_rate=0.1, weight_decay=1e-3,
                                            grad_accum_steps=k))
  plain_tx = _build(config)
  indices = datasets.batch_indices(0, 0, 2 * k, batch, len(train_split))  # two updates

  state = train.create_state(model, accumulated_tx, (28, 28, 1), seed=0)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=accumulated_tx))
  accumulated, _ = run(state, train_split.images, train_split.labels, indices)

  state = train.create_state(model, plain_tx, (28, 28, 1), seed=0)
  run = jax.jit(functools.partial(steps.train_many, apply_fn=model.apply, tx=plain_tx))
  large, _ = run(state, train_split.images, train_split.labels, indices.reshape(2, k * batch))

  for a, b in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(large.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_accumulation_stretches_the_schedule_over_updates():
  config = _optimizer_config("sgd", learning_rate=1.0, grad_accum_steps=4)
  config.schedule.name = "cosine"
  tx = _build(config, steps_per_epoch=8, total_steps=80)  # 20 updates of 4 steps
  params = {"kernel": jnp.zeros(())}
  state = tx.init(params)
  update = jax.jit(tx.update)
  lrs = []
  for _ in range(80):
    updates, state = update({"kernel": jnp.ones(())}, state, params)
    if float(updates["kernel"]) != 0:
      lrs.append(-float(updates["kernel"]))
  assert len(lrs) == 20
  assert lrs[0] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.5) and lrs[-1] < 0.01


def test_each_schedule_knob_has_one_declaration_and_the_seed_config_holds_them_all():
  fields = optim.schedule_fields()
  assert set(default.get_config().schedule) == {"name", *fields}
  for name, entry in optim.SCHEDULES.items():
    for knob, field in entry.knobs.items():
      assert fields[knob] is field and field.meaning, (name, knob)
  clash = optim.Schedule(optim._constant, {"decay_factor": optim.knobs.number(0.5, "other")})
  optim.SCHEDULES["clash"] = clash
  try:
    with pytest.raises(ValueError, match="'decay_factor' of 'clash' is declared differently"):
      optim.schedule_fields()
  finally:
    del optim.SCHEDULES["clash"]
