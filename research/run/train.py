"""The training run, top to bottom: set-up, model and state, restore, steps, loop.

`train_and_evaluate(checked, workdir)` trains a validated config (the result of
`config_validation.validate`) into `workdir` and returns the final evaluation
metrics. Running it again on the same workdir resumes from the newest complete
checkpoint (or says the run is finished).

Input: one data source, chosen from `config.dataset` once (research/data/data_source.py:
whole splits on the devices, or batches decoded by input workers); the loop only
asks its feed for the next chunk of steps. The step schedule (how many steps, when
to log, evaluate and checkpoint) is research/run/step_schedule.py.
"""

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from research import backend as backend_lib, mesh as mesh_lib, metrics as metrics_lib, models
from research.data import datasets, data_source
from research.errors import TrainingFailure
from research.run import (checkpoint, distributed, optim, profiling, run_info, step_schedule,
                          steps, workdir_lock)
from research.run import run_log as run_log_lib
from research.run.run_log import Progress, RunLog, console, evaluation_line


# ---- Model, state and evaluator: shared by training, evaluation, reports, predictions ----

def build_model_and_state(config, info: datasets.DatasetInfo, mesh, plan=None,
                          where: backend_lib.Backend | None = None):
  """(model, optimizer, jitted init_fn(seed) -> TrainState, abstract state on `mesh`);
  shared by training, evaluation, reports and predictions. `plan` (the run's
  Schedule) sets the learning-rate schedule's length; the state's structure does
  not depend on it, so restoring for evaluation needs none. `where` (default: this
  process's backend) compiles init_fn with its `init_compile_options`.

  The state is replicated, or its params and optimizer state are split over the
  devices when `config.shard_params` (FSDP-style); the abstract state carries those
  shardings, so restoring a checkpoint lays it out for the current mesh.
  """
  model = models.build(config.model, info.num_classes)
  # Without a plan (evaluation, reports, benchmarks) any long schedule gives the same
  # state structure; its values are never used for training.
  tx = optim.build_optimizer(config.optimizer, config.schedule,
                             steps_per_epoch=plan.steps_per_epoch if plan else 1,
                             total_steps=plan.total_steps if plan else 2**30)
  make_state = functools.partial(create_state, model, tx, info.image_shape)
  # Traced once, for shapes only: a model that cannot take these images fails here, named;
  # the shardings and the abstract state (what a checkpoint is restored into) follow.
  shapes = models.check_fits(config.model, info.image_shape,
                             lambda: jax.eval_shape(make_state, config.seed))
  state_sharding = mesh_lib.state_shardings(shapes, mesh, config.shard_params)
  where = where or backend_lib.current()
  init_fn = jax.jit(make_state, static_argnums=0, out_shardings=state_sharding,
                    compiler_options=where.init_compile_options)
  abstract_state = jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      shapes, state_sharding)
  return model, tx, init_fn, abstract_state


def make_evaluator(model, batches, eval_input=None):
  """Returns evaluate(state) -> metrics over every example of the split that
  `batches()` (a data source's `eval_batches`) pads into batches, each example once."""
  evaluate_all = jax.jit(functools.partial(steps.evaluate_all, apply_fn=model.apply,
                                           eval_input=eval_input))

  def evaluate(state) -> dict:
    totals = None
    for batch in batches():
      sums = evaluate_all(state.params, state.model_state, *batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return {**metrics_lib.values(totals), "num_examples": int(totals["count"]),
            "params_fingerprint": checkpoint.fingerprint(state.params)}

  return evaluate


def create_state(model, tx, image_shape, seed: int) -> steps.TrainState:
  """Initial parameters, optimizer state and RNG from `seed` (pure; jit-able)."""
  root = jax.random.key(seed)
  variables = model.init(jax.random.fold_in(root, 0), jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  params = variables.pop("params")
  return steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=dict(variables),
      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.fold_in(root, 1)))


# ---- The run ----------------------------------------------------------------------

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

  def agreed(self, step: int, checkpointer) -> bool:
    """True on every process once any process was signalled, or once JAX's preemption
    notifier (Orbax's `reached_preemption`) says so: all hosts save the same step."""
    if jax.process_count() == 1:
      return self.signal is not None
    return (distributed.any_process(self.signal is not None)
            or checkpointer.manager.reached_preemption(step))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(checked, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains `checked.config` into `workdir` while holding the workdir's lock (a second run
  on it is refused). `checked` is `config_validation.validate(config)`'s result, so every
  caller has validated the config before anything is written."""
  if not hasattr(checked, "check_workdir"):
    raise TypeError("train_and_evaluate takes config_validation.validate(config), not a "
                    f"config ({type(checked).__name__}): validate it first.")
  config = checked.config
  # ---- Set-up: the workdir's lock and stored config, the numerics ---------------
  # The matmul precision applies to everything the run traces: init, train, eval.
  with workdir_lock.WorkdirLock(workdir), backend_lib.numerics(
      config.get("matmul_precision", "default")):
    checked.check_workdir(workdir, allow_config_change)  # under the lock: one run compares
    return _train_and_evaluate(config, workdir)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the set-up built, handed to the loop; nothing below decides these again."""
  config: ml_collections.ConfigDict  # validated
  workdir: str
  info: datasets.DatasetInfo
  where: backend_lib.Backend  # CPU or accelerator forms of the compiled loop
  plan: step_schedule.Schedule
  feed: data_source.Feed
  evaluate: Callable  # state -> metrics over the whole eval split
  checkpointer: checkpoint.Checkpointer
  run_log: RunLog
  profiler: profiling.TraceWindow
  meta: dict  # saved with every checkpoint (with the feed's input position)


def _train_and_evaluate(config, workdir: str) -> dict:
  # ---- Data and the step schedule ------------------------------------------------
  source = data_source.from_config(config.dataset)  # memory or stream: decided here, once
  plan = step_schedule.resolve(config, source.num_train)
  step_schedule.check_eval_batch_size(config, source.num_eval)
  profiler = profiling.TraceWindow(config.profile_steps, workdir)

  # ---- Model and state: built once, on this run's mesh ---------------------------
  mesh = mesh_lib.make_mesh()
  where = backend_lib.current()  # CPU or accelerator forms of the compiled loop
  model, tx, init_fn, abstract_state = build_model_and_state(config, source.info, mesh, plan,
                                                             where)
  _write_config(config, workdir)  # only now: every check above has passed

  # ---- Restore: the newest complete checkpoint in the workdir, else init ----------
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                         best_metric=config.best_metric)
  state, restored_meta = _restore_or_initialize(config, checkpointer, abstract_state, init_fn,
                                                source.info.num_classes)
  start_step = int(jax.device_get(state.step))
  meta = {"config": config.to_dict(), **checkpoint.code_version()}

  # ---- Steps: the compiled train loop and evaluation, with their input ------------
  train_input, eval_input = source.input_functions(config.augment)
  state_sharding = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
  feed = source.train_feed(_train_loops(config, model, tx, train_input, state_sharding, mesh),
                           mesh, seed=config.seed, batch_size=config.batch_size, plan=plan,
                           start_step=start_step, where=where, augment_config=config.augment)
  feed.check_resumed(restored_meta, start_step)
  evaluate = make_evaluator(model, source.eval_batches(mesh, config.eval_batch_size), eval_input)

  run = _Run(config, workdir, source.info, where, plan, feed, evaluate, checkpointer,
             RunLog(workdir, resume_step=start_step), profiler, meta)
  if start_step >= plan.total_steps:
    return _already_finished(run, start_step)
  return _loop(run, state, start_step)


def _restore_or_initialize(config, checkpointer, abstract_state, init_fn, num_classes: int):
  """The resume order: the newest complete checkpoint in the workdir, else the parameters
  of `config.init_from` with a fresh optimizer, else a fresh initialization from the seed.
  Returns (state, the restored checkpoint's meta, or None)."""
  # Either way the state is read onto this run's mesh, whatever device count wrote it;
  # the parameters' fingerprint (a collective: every process computes it) shows they
  # arrived unchanged.
  restored = checkpointer.restore(abstract_state)
  if restored is not None:
    state, restored_meta = restored
    params = checkpoint.fingerprint(state.params)
    console("Resumed from checkpoint step %d in %s (params %s).", int(state.step),
            checkpointer.directory, params)
    return state, restored_meta
  state = init_fn(config.seed)
  if config.init_from:
    state = checkpoint.initialize_from(state, config.init_from, num_classes,
                                       config.init_reinit_head)
    params = checkpoint.fingerprint(state.params)
    console("Initialized from %s (params %s).", config.init_from, params)
  return state, None


@dataclasses.dataclass(frozen=True)
class TrainLoops:
  """The train loop in the two forms a data source's feed may need, compiled when asked:
  `on_indices()` gathers each step's batch from a split held on the devices
  (steps.train_many), `on_batches()` takes the batches it is given (steps.train_on_batches)."""

  compile: Callable

  def on_indices(self):
    return self.compile(steps.train_many)

  def on_batches(self):
    return self.compile(steps.train_on_batches)


def _train_loops(config, model, tx, train_input, state_sharding, mesh) -> TrainLoops:
  """Both loops run the same train_step, donate the old state and lay the new one out as
  before."""
  microbatches = step_schedule.microbatch_count(config)

  def compile_loop(loop):
    return jax.jit(functools.partial(
        loop, apply_fn=model.apply, tx=tx, label_smoothing=config.label_smoothing,
        train_input=train_input, microbatches=microbatches),
        donate_argnums=0, out_shardings=(state_sharding, mesh_lib.replicated(mesh)))

  return TrainLoops(compile_loop)


def _already_finished(run: _Run, start_step: int) -> dict:
  """A rerun of a finished run: its last evaluation, nothing trained or written."""
  final = run_log_lib.final_evaluation(run_info.read_metrics(run.workdir))
  console("Run in %s already finished at step %d; final %s accuracy %s.", run.workdir,
          start_step, final.get("split", run.config.dataset.eval_split), final.get("accuracy"))
  run.run_log.close()
  run.checkpointer.close()
  run.feed.close()
  return final


# ---- Loop -----------------------------------------------------------------------

def _loop(run: _Run, state, start_step: int) -> dict:
  """Chunks of compiled steps to the end; between two, the host logs, evaluates,
  checkpoints, or stops for a preemption. Returns the final evaluation."""
  config, plan, checkpointer = run.config, run.plan, run.checkpointer
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  step = start_step
  final = {}
  window = []  # per-step train metrics since the last log line
  train_seconds = 0.0  # time inside training chunks only (no eval, no checkpoints)
  with (_PreemptionFlag() as preempted, contextlib.closing(run.feed),
        run_info.RunRecord(run.workdir, config, start_step, run.info, run.where) as record,
        run.profiler):
    # Printed once SIGTERM/SIGINT are caught: from this line on, a signal is a checkpoint.
    console("Training %s (%d parameters) on %s: %d steps (%d per epoch), batch %d, %d "
            "device(s).", config.model.name, n_params, run.info.name, plan.total_steps,
            plan.steps_per_epoch, config.batch_size, jax.device_count())
    progress = Progress(plan, config.batch_size, start_step)
    started = time.perf_counter()
    while step < plan.total_steps:
      # A profiled window starts and ends between two calls.
      stop = run.profiler.clip(step, plan.next_stop(step))
      run.profiler.before_chunk(step)
      chunk_started = time.perf_counter()
      state, metrics, input_seconds = run.feed.chunk(state, step, stop)
      progress.chunk_done(stop, input_seconds, time.perf_counter() - chunk_started - input_seconds,
                          float(np.mean(metrics["loss"])), float(np.mean(metrics["accuracy"])))
      _check_finite(metrics, step, checkpointer)
      window.append(metrics)
      step = record.step = stop
      run.profiler.after_chunk(step)
      elapsed = time.perf_counter() - started
      train_seconds += time.perf_counter() - chunk_started

      if step_schedule.is_time(step, plan.log_every) or step == plan.total_steps:
        _log_train(run.run_log, progress, plan, step, window, elapsed, train_seconds)
        window = []
      eval_now = step_schedule.is_time(step, plan.eval_every) or step == plan.total_steps
      if eval_now:
        progress.end_phase()
        final = _evaluate(run, state, step, started)
      stop_now = preempted.agreed(step, checkpointer) and step < plan.total_steps
      if (eval_now or step_schedule.is_time(step, plan.checkpoint_every)
          or step == plan.total_steps or stop_now):
        checkpointer.save(state, {**run.meta, **run.feed.checkpoint_meta()}, metrics=(
            {config.best_metric: final[config.best_metric]} if eval_now else None))
      if stop_now:
        _stop_for_preemption(run, progress, preempted.signal, step)

  # ---- End: the last evaluation above (at the final step) is the run's result -----
  checkpointer.wait()
  checkpointer.close()
  run.run_log.close()
  console("Finished %d steps in %.1f s. Final %s accuracy %.4f, loss %.4f, params %s.",
          plan.total_steps, time.perf_counter() - started, config.dataset.eval_split,
          final["accuracy"], final["loss"], final["params_fingerprint"])
  return final


def _log_train(run_log, progress, plan, step: int, window: list, elapsed: float,
               train_seconds: float) -> None:
  """One train record (metrics.jsonl, TensorBoard) and console line: the means over
  `window`, the steps since the last one."""
  train_metrics = {k: float(np.mean(np.concatenate([w[k] for w in window])))
                   for k in ("loss", "accuracy")}
  speed = progress.update(step)
  run_log.write("train", step, plan.epoch(step), elapsed, **train_metrics,
                steps_per_sec=round(speed["steps_per_sec"], 2),
                train_seconds=round(train_seconds, 3),
                input_sec=round(speed["input_sec"], 4),
                compute_sec=round(speed["compute_sec"], 4))
  progress.log_line(step, train_metrics, speed)


def _evaluate(run: _Run, state, step: int, started: float) -> dict:
  """Every example of the eval split once; the record (its time counted from `started`,
  the evaluation included) and the console line name the split."""
  split = run.config.dataset.eval_split
  metrics = run.evaluate(state)
  run.run_log.write_evaluation(split, step, run.plan.epoch(step), time.perf_counter() - started,
                               **metrics)
  console("%s", evaluation_line(step, run.plan.epoch(step), split, metrics))
  return metrics


def _stop_for_preemption(run: _Run, progress, signum, step: int) -> None:
  """Waits for the checkpoint just saved, then exits with 128 + the signal's number."""
  progress.end_phase()
  run.checkpointer.wait()
  signum = signum or signal.SIGTERM  # another host may have been signalled
  console("Preempted (%s): checkpoint at step %d is on disk; rerun the same command to "
          "resume.", signal.Signals(signum).name, step)
  run.run_log.close()
  run.checkpointer.close()
  raise SystemExit(128 + signum)


def _check_finite(metrics: dict, first_step: int, checkpointer) -> None:
  """Stops at the first step whose loss or gradient norm is not finite, naming both."""
  first_bad = {}
  for name in ("loss", "grad_norm"):
    bad = np.flatnonzero(~np.isfinite(metrics[name]))
    if bad.size:
      first_bad[name] = int(bad[0])
  if not first_bad:
    return
  index = min(first_bad.values())
  names = [name for name, at in first_bad.items() if at == index]
  quantities = " and the ".join(f"{name.replace('_', ' ')} ({metrics[name][index]})"
                                for name in names)
  checkpointer.wait()
  last_good = checkpointer.latest_step()
  kept = ("No checkpoint had been written yet." if last_good is None else
          f"The last good checkpoint (step {last_good}) is untouched.")
  raise TrainingFailure(
      f"Training stopped: the {quantities} became non-finite at step {first_step + index + 1}. "
      f"{kept} Lower --config.optimizer.learning_rate or check the data.")


def _write_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


# ---- --mode=eval: one checkpoint of a workdir, evaluated again ----------------------

def evaluate_checkpoint(config, workdir: str) -> dict:
  """`--mode=eval`: evaluates one checkpoint of `workdir` on `config.eval.split`.

  Appends the result to WORKDIR/eval.jsonl (metrics.jsonl stays the training record).
  """
  # Workdirs written before matmul_precision existed ran at the default.
  with backend_lib.numerics(config.get("matmul_precision", "default")):
    return _evaluate_checkpoint(config, workdir)


def _evaluate_checkpoint(config, workdir: str) -> dict:
  checkpointer = checkpoint.Checkpointer(workdir, best_metric=config.best_metric, read_only=True)
  step = checkpointer.resolve_step(config.eval.checkpoint_step)
  source = data_source.from_config(config.dataset, config.eval.split, train=False)
  info = source.info
  mesh = mesh_lib.make_mesh()
  model, _, _, abstract_state = build_model_and_state(config, info, mesh)
  state, _ = checkpointer.restore(abstract_state, step)
  eval_input = source.input_functions(config.augment)[1]
  metrics = make_evaluator(model, source.eval_batches(mesh, config.eval_batch_size),
                           eval_input)(state)
  checkpointer.close()
  record = {"step": step, "checkpoint": str(config.eval.checkpoint_step),
            "split": config.eval.split, **metrics}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")
  console("Checkpoint step %d on %s: loss %.4f accuracy %.4f (%d examples) | params %s", step,
          config.eval.split, metrics["loss"], metrics["accuracy"], metrics["num_examples"],
          metrics["params_fingerprint"])
  return record
