"""Image classification research codebase in JAX/Flax.

Where things live:
  main.py          command line entry point (flags -> train.train_and_evaluate)
  command_line.py  flag parsing: every flag mistake becomes one clear UserError
  workdir_lock.py  one training run per workdir (WORKDIR/run.lock)
  train.py         the training loop: set-up, restore, compiled steps, eval, checkpoints
  steps.py         pure loss / train-step / eval-step functions
  data_source.py   the data source chosen once from config.dataset (memory or stream)
  data.py          dataset metadata, epoch order, the in-memory form, padded eval batches
  stream_input.py  the streamed form: batches decoded in worker processes while training
  stream_examples.py, image_crops.py  what a worker computes: examples, ImageNet crops
  host_buffers.py  host memory of finished batches: handed to the devices with no copy
  augment.py       on-device augmentation and normalization inside the train step
  prepare_data.py  getting a TFDS dataset prepared (offline sources first)
  models/          the model zoo, chosen by `config.model.name`
  optim.py         optimizers and schedules, chosen by `config.optimizer.name` / `config.schedule.name`
  checkpoint.py    Orbax checkpoints: save, resume, best-by-metric
  run_log.py       metrics.jsonl, TensorBoard and console progress (bars in a terminal)
  run_info.py      run.json: config, code and library versions, devices, times, results
  profiling.py     jax.profiler trace of chosen steps (config.profile_steps)
  classifier.py    a trained workdir's model as images -> class probabilities
  report.py        python -m research.report: curves, confusion matrix, comparisons
  predict.py       python -m research.predict: top-k classes of image files
  config_checks.py validation and resolution of a config before anything runs
  mesh.py          the device mesh; batch and parameter shardings
  distributed.py   joining jax.distributed (flags, SLURM, Cloud TPU VM)
"""

__version__ = "0.1.0"
