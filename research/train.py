"""The training loop, top to bottom: set-up, data, model, restore, steps, loop.

`train_and_evaluate(config, workdir)` trains `config` into `workdir` and returns
the final evaluation metrics. Running it again on the same workdir resumes from
the newest complete checkpoint (or says the run is finished).
"""

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from research import augment, checkpoint, config_checks, data, mesh as mesh_lib, models, optim, steps
from research.errors import TrainingFailure
from research.run_log import Progress, RunLog, console, format_eta


def create_state(model, tx, image_shape, seed: int) -> steps.TrainState:
  """Initial parameters, optimizer state and RNG from `seed` (pure; jit-able)."""
  root = jax.random.key(seed)
  variables = model.init(jax.random.fold_in(root, 0), jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  params = variables.pop("params")
  return steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.fold_in(root, 1)))


class _PreemptionFlag:
  """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the next step boundary."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal = signum
    logging.warning("Received %s: will checkpoint and exit after the current step.",
                    signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  # ---- Set-up: config, data, schedule -------------------------------------
  config_checks.validate(config)
  models.build(config.model, num_classes=1)  # unknown names and knobs fail before any data is read
  optim.check(config.optimizer, config.schedule)
  config_checks.check_workdir_config(config, workdir, allow_config_change)
  info, train_split, eval_split = data.load(config.dataset)
  plan = config_checks.schedule(config, len(train_split))
  os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)

  # ---- Mesh and device-resident data --------------------------------------
  mesh = mesh_lib.make_mesh()
  train_images = mesh_lib.put_replicated(train_split.images, mesh)
  train_labels = mesh_lib.put_replicated(train_split.labels, mesh)
  eval_arrays = [mesh_lib.global_batch(a, mesh, batch_axis=1)
                 for a in data.padded_for_eval(eval_split, config.eval_batch_size)]

  # ---- Model, optimizer, state ---------------------------------------------
  model = models.build(config.model, info.num_classes)
  tx = optim.build_optimizer(config.optimizer, config.schedule,
                             steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps)
  init_fn = jax.jit(functools.partial(create_state, model, tx, info.image_shape),
                    static_argnums=0, out_shardings=mesh_lib.replicated(mesh))
  abstract_state = jax.eval_shape(init_fn, config.seed)
  abstract_state = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=mesh_lib.replicated(mesh)),
      abstract_state)

  # ---- Restore: the newest complete checkpoint in the workdir, else init ----
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  restored = checkpointer.restore(abstract_state)
  if restored is not None:
    state = restored[0]
    console("Resumed from checkpoint step %d in %s.", int(state.step), checkpointer.directory)
  else:
    state = init_fn(config.seed)
  start_step = int(jax.device_get(state.step))
  meta = {"config": config.to_dict(), **checkpoint.code_version()}

  # ---- Compiled steps -------------------------------------------------------
  mean, std = data.normalization(info.name, train_split) if config.dataset.normalize else (None, None)
  train_many = jax.jit(functools.partial(
      steps.train_many, apply_fn=model.apply, tx=tx, label_smoothing=config.label_smoothing,
      train_input=augment.make_train_input(config.augment, mean, std)), donate_argnums=0)
  evaluate_all = jax.jit(functools.partial(steps.evaluate_all, apply_fn=model.apply,
                                           eval_input=augment.make_eval_input(mean, std)))

  def evaluate(state) -> dict:
    totals = jax.device_get(evaluate_all(state.params, state.model_state, *eval_arrays))
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count,
            "num_examples": int(count), "params_fingerprint": checkpoint.fingerprint(state.params)}

  run_log = RunLog(workdir, resume_step=start_step)
  if start_step >= plan.total_steps:
    final = _last_eval(workdir)
    console("Run in %s already finished at step %d; final test accuracy %s.", workdir, start_step,
            final.get("accuracy"))
    run_log.close()
    checkpointer.close()
    return final

  # ---- Loop -------------------------------------------------------------------
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  console("Training %s (%d parameters) on %s: %d steps (%d per epoch), batch %d, %d device(s).",
          config.model.name, n_params, info.name, plan.total_steps, plan.steps_per_epoch,
          config.batch_size, jax.device_count())
  progress = Progress(plan.total_steps, config.batch_size, start_step)
  started = time.perf_counter()
  step = start_step
  final = {}
  window = []  # per-step train metrics since the last log line
  with _PreemptionFlag() as preempted:
    while step < plan.total_steps:
      stop = plan.next_stop(step, max_chunk=config.steps_per_call or plan.log_every)
      indices = data.batch_indices(config.seed, step, stop - step, config.batch_size,
                                   len(train_split))
      state, metrics = train_many(state, train_images, train_labels,
                                  mesh_lib.global_batch(indices, mesh, batch_axis=1))
      metrics = jax.device_get(metrics)
      _check_finite(metrics, step, checkpointer)
      window.append(metrics)
      step = stop
      elapsed = time.perf_counter() - started

      if config_checks.is_time(step, plan.log_every) or step == plan.total_steps:
        train_metrics = {k: float(np.mean(np.concatenate([w[k] for w in window])))
                         for k in ("loss", "accuracy")}
        window = []
        speed = progress.update(step)
        run_log.write("train", step, plan.epoch(step), elapsed, **train_metrics,
                      steps_per_sec=round(speed["steps_per_sec"], 2))
        console("step %d/%d epoch %.2f | train loss %.4f acc %.4f | %.1f steps/s %.0f img/s | ETA %s",
                step, plan.total_steps, plan.epoch(step), train_metrics["loss"],
                train_metrics["accuracy"], speed["steps_per_sec"], speed["images_per_sec"],
                format_eta(speed["eta_sec"]))

      eval_now = config_checks.is_time(step, plan.eval_every) or step == plan.total_steps
      if eval_now:
        final = evaluate(state)
        run_log.write("test", step, plan.epoch(step), time.perf_counter() - started, **final)
        console("step %d epoch %.2f | test loss %.4f acc %.4f (%d examples) | params %s", step,
                plan.epoch(step), final["loss"], final["accuracy"], final["num_examples"],
                final["params_fingerprint"])
      if (eval_now or config_checks.is_time(step, plan.checkpoint_every)
          or step == plan.total_steps or preempted.signal):
        checkpointer.save(state, meta, metrics=(
            {checkpoint.BEST_METRIC: final[checkpoint.BEST_METRIC]} if eval_now else None))
      if preempted.signal and step < plan.total_steps:
        checkpointer.wait()
        console("Preempted (%s): checkpoint at step %d is on disk; rerun the same command to "
                "resume.", signal.Signals(preempted.signal).name, step)
        run_log.close()
        checkpointer.close()
        raise SystemExit(128 + preempted.signal)
      progress.restart_clock()

  checkpointer.wait()
  checkpointer.close()
  run_log.close()
  console("Finished %d steps in %.1f s. Final test accuracy %.4f, loss %.4f, params %s.",
          plan.total_steps, time.perf_counter() - started, final["accuracy"], final["loss"],
          final["params_fingerprint"])
  return final


def _check_finite(metrics: dict, first_step: int, checkpointer) -> None:
  for name in ("loss", "grad_norm"):
    bad = np.flatnonzero(~np.isfinite(metrics[name]))
    if bad.size:
      checkpointer.wait()
      raise TrainingFailure(
          f"Training stopped: the {name.replace('_', ' ')} became non-finite "
          f"({metrics[name][bad[0]]}) at step {first_step + int(bad[0]) + 1}. The last good "
          f"checkpoint (step {checkpointer.latest_step()}) is untouched. Lower "
          "--config.optimizer.learning_rate or check the data.")


def _write_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def _last_eval(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  last = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        if record.get("split") == "test":
          last = record
  return last
