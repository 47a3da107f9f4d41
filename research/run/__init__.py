"""One training run, start to end, in the workdir it owns.

  train.py           the training loop, top to bottom: set-up, data, model, restore, steps, loop
  step_schedule.py   the run's steps: how many, when to log, evaluate and checkpoint
  steps.py           pure loss / train-step / eval-step functions
  optim.py           optimizers and learning-rate schedules, built from optax by name
  checkpoint.py      Orbax checkpoints: save, resume, best-by-metric
  run_log.py         metrics.jsonl, TensorBoard and console progress
  run_info.py        run.json: config, code and library versions, devices, times, results
  workdir_layout.py  what a workdir holds, checked before a run writes
  workdir_lock.py    one training run per workdir (WORKDIR/run.lock)
  distributed.py     joining jax.distributed (flags, SLURM, Cloud TPU VM)
  compile_cache.py   JAX's persistent compilation cache between runs
  profiling.py       a jax.profiler trace of chosen steps (config.profile_steps)
"""
