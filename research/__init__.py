"""Image classification research codebase in JAX/Flax.

Where things live:
  main.py          command line entry point (flags -> train.train_and_evaluate)
  train.py         the training loop: set-up, restore, compiled steps, eval, checkpoints
  steps.py         pure loss / train-step / eval-step functions
  data.py          datasets held in memory, epoch order, padded eval batches
  augment.py       on-device augmentation and normalization inside the train step
  prepare_data.py  getting a TFDS dataset prepared (offline sources first)
  models/          the model zoo, chosen by `config.model.name`
  optim.py         optimizers and schedules, chosen by `config.optimizer.name` / `config.schedule.name`
  checkpoint.py    Orbax checkpoints: save, resume, best-by-metric
  run_log.py       metrics.jsonl, TensorBoard and console progress
  config_checks.py validation and resolution of a config before anything runs
"""

__version__ = "0.1.0"
