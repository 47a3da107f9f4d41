"""Checkpoint retention and fingerprints, on real Orbax checkpoints of a tiny state."""

import jax.numpy as jnp
import pytest

from research import checkpoint


def _state(step):
  return {"step": jnp.int32(step), "params": {"w": jnp.full((3,), float(step))}}


@pytest.mark.parametrize("metric,values,best", [
    ("accuracy", [0.5, 0.9, 0.6, 0.7, 0.65], 2),
    ("loss", [0.5, 0.9, 0.1, 0.7, 0.65], 3)])
def test_keeps_the_last_n_and_the_best_by_the_chosen_metric(tmp_path, metric, values, best):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric=metric)
  for step, value in enumerate(values, start=1):
    state = _state(step)
    ckpt.manager.save(step, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardSave(state), meta=checkpoint.ocp.args.JsonSave({})),
        metrics={metric: value})
  ckpt.wait()
  assert ckpt.steps() == sorted({best, 4, 5})
  assert ckpt.best_step() == best
  assert ckpt.resolve_step("best") == best and ckpt.resolve_step("latest") == 5
  ckpt.close()


def test_fingerprint_changes_with_any_bit_and_not_with_dict_order():
  a = {"x": jnp.arange(4.0), "y": jnp.ones((2, 2))}
  b = {"y": jnp.ones((2, 2)), "x": jnp.arange(4.0)}
  c = {"x": jnp.arange(4.0).at[3].set(3.0000002), "y": jnp.ones((2, 2))}
  assert checkpoint.fingerprint(a) == checkpoint.fingerprint(b)
  assert checkpoint.fingerprint(a) != checkpoint.fingerprint(c)
