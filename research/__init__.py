"""Image classification research codebase in JAX/Flax.

Folders by job; each folder's `__init__.py` maps its modules. A folder imports only
the ground floor and the folders listed above it here (tests/test_layout.py checks both
the maps and the direction):

  models/     the model zoo, chosen by `config.model.name`
  data/       datasets, preparing them, the in-memory and streamed input, augmentation
  run/        one training run, start to end: the loop, steps, optimizers, checkpoints, logs
  config/     the command line, every config field, and the checks before a run starts
  tools/      commands that read or measure runs: report, predict, benchmarks, checks
  studies/    hyperparameter studies on Optuna
  peers/      the Keras and PyTorch scripts `make bench-compare` runs; never imported

The ground floor, used by every folder:

  main.py     `python -m research.main`: its flags, logging, and errors as one line + exit 2
  program.py  what main runs with the flags' values: set-up, config checks, train or eval
  errors.py   UserError and TrainingFailure: mistakes and failures reported in one line
  knobs.py    a config field's declaration, made next to the code that reads it
  backend.py  where a run executes (CPU or accelerator forms), decided once
  mesh.py     the device mesh and how host arrays become global arrays on it
  metrics.py  the evaluation metrics, each entry all a metric needs

Commands kept at the top so that `python -m research.NAME` stays short; each runs the
module named in it: bench_compare.py, bench_input.py, benchmark.py, check_accelerator.py,
command_line.py, predict.py, prepare_data.py, report.py.
"""

import os

__version__ = "0.1.0"
# The repository this package runs from (configs/, the git history): benchmarks and run.json.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
