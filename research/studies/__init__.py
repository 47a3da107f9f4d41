"""Hyperparameter studies on Optuna (`python -m launch.sweep`).

  study.py          the study, its objective and the worker loop
  study_storage.py  the study's storage from --storage: a database URL or a journal file
  study_trial.py    one trial: `python -m research.main` in the trial's workdir, watched
  search_space.py   which config fields vary, and over what
  study_results.py  results.csv/.md, plots and TensorBoard HParams in the study's folder
"""
