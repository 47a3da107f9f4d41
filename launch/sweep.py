"""Hyperparameter studies on Optuna: grids, random and TPE search, pruning, many workers.

  python -m launch.sweep --config=configs/default.py --workdir=runs/study1 \\
      --space='optimizer.learning_rate=loguniform(1e-4,3e-2);batch_size=choice(32,64,128)' \\
      --search=tpe --trials=20 --pruner=median -- --config.num_epochs=3

  python -m launch.sweep --config=configs/default.py --workdir=runs/sweep1 \\
      --sweep='optimizer.name=adam,sgd;optimizer.learning_rate=1e-3,3e-4'   # a grid

The space (`--space`/`--sweep`, or a file: `--space_file`/`--sweep_file`, one entry
per line) is described in research/studies/search_space.py; it is checked against the
config before anything is written. Each trial trains with `python -m research.main`
into WORKDIR/trials/trial-NNNN on `--train_split` and reports every evaluation on
`--select_split` to the study, whose pruner may stop it; flags after `--` go to every
trial. At the end the chosen trial alone is evaluated on `--test_split`, and
WORKDIR gets results.csv/.md, plots and TensorBoard HParams (research/studies/study_results.py).

Running the same command again resumes the study. `--workers=K` runs K trials at
once here; `--storage=postgresql://...` (or a journal file on shared storage) lets
workers on other machines join, and `--launcher=slurm --array=K` submits K of them
as a SLURM array job (launch/study_array.sbatch). Long form: docs/studies.md.

The flags are read once, at the entry point, into `Options` (`read_options`); every
function below is given what it needs.
"""

import functools
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import types

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARRAY_SCRIPT = os.path.join(REPO, "launch", "study_array.sbatch")
SEARCHES = ("grid", "random", "tpe")
PRUNERS = ("median", "hyperband", "asha", "none")

FLAGS = flags.FLAGS  # the command's own flags: read by the entry point only


def read_options(flag_values) -> types.SimpleNamespace:
  """The values of this command's flags in `flag_values` (parsed), as attributes: a copy,
  which a later parse leaves alone."""
  own = flags.FlagValues()
  _define_flags(own)
  return types.SimpleNamespace(**{name: flag_values[name].value for name in own})


def _space_text(options) -> tuple[str, str]:
  """(text, where it came from) of exactly one of --space, --sweep, --space_file, --sweep_file."""
  from research.errors import UserError

  given = [(name, getattr(options, name)) for name in ("space", "sweep", "space_file",
                                                       "sweep_file") if getattr(options, name)]
  if len(given) != 1:
    raise UserError("Give exactly one search space: --space='FIELD=SPEC;...' (or --sweep=, the "
                    "same), or --space_file=FILE (or --sweep_file=); e.g. "
                    "--space='optimizer.learning_rate=loguniform(1e-4,3e-2)'.")
  name, value = given[0]
  if not name.endswith("_file"):
    return value, f"--{name}"
  try:
    with open(value) as f:
      return f.read(), value
  except OSError as e:
    raise UserError(f"--{name}={value!r} cannot be read: {e.strerror}.") from e


def make_plan(options, extra: list[str]):
  """Checks the whole command line (`options`, and `extra`: the flags after '--'), writing
  nothing; returns the study's Plan."""
  from research.config import command_line
  from research.studies import search_space, study, study_storage
  from research.errors import UserError

  if not options.config or not options.workdir:
    raise UserError("--config and --workdir are required, e.g. --config=configs/default.py "
                    "--workdir=runs/study1.")
  _check_numbers(options)
  if options.objective not in study.OBJECTIVES:
    raise UserError(f"--objective={options.objective!r} is not a metric; use one of "
                    f"{', '.join(study.OBJECTIVES)} (research/metrics.py lists them).")
  if os.path.exists(options.workdir) and not os.path.isdir(options.workdir):
    raise UserError(f"--workdir={options.workdir!r} is a file: give the study's folder (new or "
                    "existing).")
  text, source = _space_text(options)
  params = search_space.parse(text, source)
  finite = all(param.grid_values() is not None for param in params)
  search = options.search or ("grid" if finite and not options.trials else "tpe")
  if search == "grid":
    count = len(search_space.grid_points(params))
    if options.trials and options.trials != count:
      raise UserError(f"--trials={options.trials} does not fit --search=grid: the grid has "
                      f"{count} points, and each is one trial. Leave --trials out.")
    trials = count
  else:
    if options.trials <= 0:
      raise UserError(f"--search={search} needs --trials=N (a positive number of trials).")
    trials = options.trials
  for flag in extra:
    if not re.match(r"^--config\.[\w.]+=", flag):
      raise UserError(f"{flag!r} after '--' is not accepted: only --config.FIELD=VALUE flags "
                      "go to every trial (the study sets --config and --workdir).")
  if options.select_split == options.train_split:
    raise UserError(f"--select_split={options.select_split!r} is the training split itself: "
                    "hold out another part, e.g. --train_split='train[:90%]' "
                    "--select_split='train[90%:]'.")
  fixed = (*study.split_flags(options.train_split, options.select_split), *extra)
  search_space.check(params, options.config, list(fixed))
  _check_splits(command_line.parse_config(list(fixed), options.config).dataset,
                {flag: getattr(options, flag)
                 for flag in ("train_split", "select_split", "test_split")})
  if study_storage.is_url(options.storage):
    study_storage.database_url(options.storage)  # its kind and driver; connecting comes later
  elif options.storage:
    study_storage.check_journal_folder(options.storage)
  root = os.path.abspath(options.workdir)
  return study.Plan(
      root=root, config_file=options.config, params=tuple(params), search=search, trials=trials,
      sampler_seed=options.sampler_seed, pruner=options.pruner, storage=options.storage,
      study_name=options.study_name or os.path.basename(root), fixed=tuple(fixed),
      train_split=options.train_split, select_split=options.select_split,
      test_split=options.test_split, objective=options.objective,
      heartbeat_seconds=options.heartbeat, timeout_seconds=options.timeout)


MAX_TRIALS = 100_000  # all are enqueued when the study is set up
MAX_SEED = 2**32 - 1  # NumPy's seeds


def _check_numbers(options) -> None:
  """The numeric flags, before anything slower: each within what it can mean."""
  from research.errors import UserError

  checks = [
      ("trials", 0 <= options.trials <= MAX_TRIALS, f"from 1 to {MAX_TRIALS} (0: a grid's own "
       "count)"),
      ("sampler_seed", 0 <= options.sampler_seed <= MAX_SEED,
       f"an integer from 0 to {MAX_SEED}"),
      ("heartbeat", math.isfinite(options.heartbeat) and 0 < options.heartbeat <= 86400,
       "a positive number of seconds, at most a day"),
      ("timeout", not math.isnan(options.timeout) and options.timeout >= 0,
       "seconds, 0 for none"),
      ("workers", 1 <= options.workers <= 4096, "a positive number of trials at once here"),
      ("array", 0 <= options.array <= 100_000, "the number of SLURM array tasks, e.g. 8"),
  ]
  for name, fine, accepted in checks:
    if not fine:
      raise UserError(f"--{name}={getattr(options, name)} is not accepted: {accepted}.")
  try:
    shlex.split(options.sbatch_args)
  except ValueError as e:
    raise UserError(f"--sbatch_args={options.sbatch_args!r} cannot be split into options ({e}): "
                    "quote as in a shell, e.g. --sbatch_args='--time=2:00:00'.") from None


def parse_command_line(argv: list[str], flag_values) -> list[str]:
  """absl's parse of `argv` into `flag_values` (those of `_define_flags`), its mistakes (an
  unknown flag, a wrong type, a value outside an enum) in one line: a UserError."""
  from research.errors import UserError

  try:
    return flag_values(argv)
  except flags.Error as e:
    if isinstance(e, flags.UnrecognizedFlagError):
      ours = next(defined for defined in flag_values.flags_by_module_dict().values()
                  if any(flag.name == "space" for flag in defined))  # this module's
      known = ", ".join(f"--{flag.name}" for flag in ours)
      message = f"--{e.flagname} is not a flag of launch.sweep. Flags: {known}."
    else:
      message = " ".join(str(e).split()).removeprefix("flag ")
    raise UserError(f"{message} (`python -m launch.sweep --help` describes every flag.)") from None


def _check_splits(dataset_config, splits: dict[str, str]) -> None:
  """Each split ({flag: split}) names part of the dataset (opened, not read): a typo fails
  now, not after the last trial."""
  from research.data import data_source
  from research.errors import UserError

  for flag, split in splits.items():
    try:
      data_source.StreamSource(dataset_config, split, train=False)
    except UserError as e:  # TFDS's own reason can span lines
      raise UserError(f"--{flag}={split!r}: {' '.join(str(e).split())}") from None


class _StopOnSignal:
  """SIGINT/SIGTERM: every worker asks its trainer to checkpoint and exit; the study resumes
  on the next run of the same command."""

  def __init__(self):
    self.stop = threading.Event()
    self.signal = None

  def __enter__(self):
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT,
                                                                         signal.SIGTERM)}
    return self

  def _handle(self, signum, frame):
    self.signal = signum
    self.stop.set()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run(options, extra: list[str], command_line_args: list[str]) -> int:
  """The study command: `options` (read_options), `extra` (the flags after '--') and its
  whole command line without the program (`command_line_args`, handed on to sbatch)."""
  logging.set_verbosity(logging.WARNING)  # TFDS's notes while the splits are checked
  base_env = dict(os.environ)  # the trainers' environment: they pick their own devices
  # This process never computes: JAX stays off the accelerators that the trainers use.
  os.environ["JAX_PLATFORMS"] = "cpu"
  from research.config import command_line
  from research.studies import study, study_results, study_storage, study_trial
  from research.errors import UserError

  plan = make_plan(options, extra)
  slots = study_trial.device_slots(options.workers, base_env)  # the trainers' devices
  if options.launcher == "slurm":
    if shutil.which("sbatch") is None:
      raise UserError("--launcher=slurm needs SLURM's `sbatch`, which is not on PATH here. "
                      "Submit from the cluster's login node, or use --launcher=local.")
    if options.array < 1:
      raise UserError(f"--array={options.array} is not accepted: the number of workers (array "
                      "tasks) to submit, e.g. --array=8.")
  if options.dry_run:
    print(f"Study {plan.study_name} in {plan.root}: {plan.search} search, {plan.trials} trials, "
          f"pruner {plan.pruner}, storage {plan.storage or os.path.join(plan.root, 'study.journal')}"
          f", {len(slots)} worker(s): {'; '.join(s.description for s in slots)}.")
    for param in plan.params:
      print(f"  {param.describe()}")
    print("Each trial: " + shlex.join(command_line.main_command(
        plan.config_file, plan.trial_workdir(0), plan.fixed, python="python")) + " ...")
    return 0
  # A database is reached (or refused, in one line) before the study folder is made.
  storage = study.make_storage(plan) if study_storage.is_url(plan.storage) else None
  os.makedirs(plan.root, exist_ok=True)
  opened = study.Study(plan, storage)
  if options.launcher == "slurm":
    return _submit_array(plan, options, command_line_args)
  print(f"Study {plan.study_name} in {plan.root}: {plan.search} search, {plan.trials} trials "
        f"({opened.count(*_waiting())} waiting), {len(slots)} worker(s) here.", flush=True)
  with _StopOnSignal() as stopper:
    try:
      study.run_workers(opened, slots, stopper.stop, base_env)
    finally:
      if stopper.signal is None:
        import optuna

        if opened.count(optuna.trial.TrialState.RUNNING) == 0:
          opened.evaluate_best_on_test({**base_env, **slots[0].env})
      table = study_results.write(opened)
  print(study_results.summary_text(opened, table), flush=True)
  print(f"Results: {os.path.join(plan.root, 'results.md')} (and .csv, plots, hparams/)",
        flush=True)
  if stopper.signal is not None:
    print(f"Study stopped by {signal.Signals(stopper.signal).name}; run the same command to "
          "resume.", flush=True)
    return 128 + stopper.signal
  return 0


def _waiting():
  import optuna

  return (optuna.trial.TrialState.WAITING,)


def _submit_array(plan, options, command_line_args: list[str]) -> int:
  """`sbatch --array=0-(K-1) launch/study_array.sbatch ARGS`: each task is one worker on the
  study just set up (its storage must be one every node reaches). ARGS: this command's
  `command_line_args` without the flags that only concern submitting."""
  from research.errors import UserError

  own = ("--launcher", "--array", "--sbatch_args", "--workers", "--dry_run")
  args = [arg for arg in command_line_args if arg == "--" or not arg.startswith(own)]
  command = ["sbatch", f"--array=0-{options.array - 1}", f"--job-name=study:{plan.study_name}",
             f"--output={os.path.join(plan.root, 'slurm-%A_%a.out')}",
             *shlex.split(options.sbatch_args), ARRAY_SCRIPT, *args]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise UserError(f"sbatch refused the array job (exit status {result.returncode}): "
                    f"{result.stderr.strip() or result.stdout.strip()}")
  print(f"Submitted {options.array} workers: {result.stdout.strip()}. Run the same command with "
        "--launcher=local to join as a worker or to write the results.", flush=True)
  return 0


def _define_flags(flag_values) -> None:
  """This command's flags, defined in `flag_values` when the command runs (absl's FLAGS) or a
  test asks (fresh FlagValues of its own): importing this module defines none."""
  own = {"flag_values": flag_values}
  flags.DEFINE_string("config", None, "Config file (as for research.main), e.g. "
                      "configs/default.py or configs/default.py:model=cnn.", **own)
  flags.DEFINE_string("workdir", None, "The study's folder: storage, trials/, results.", **own)
  flags.DEFINE_string("space", "", "Search space: 'FIELD=SPEC;FIELD=SPEC' "
                      "(research/studies/search_space.py).", **own)
  flags.DEFINE_string("sweep", "", "The same as --space (a grid: 'key=v1,v2;key2=v3,v4').",
                      **own)
  flags.DEFINE_string("space_file", "", "A file with one FIELD=SPEC entry per line.", **own)
  flags.DEFINE_string("sweep_file", "", "The same as --space_file.", **own)
  flags.DEFINE_enum("search", "", ["", *SEARCHES], "grid | random | tpe (default: grid when no "
                    "--trials and every entry has finite values, else tpe).", **own)
  flags.DEFINE_integer("trials", 0, "Trials in the study (random, tpe); a grid has one per "
                       "point.", **own)
  flags.DEFINE_integer("sampler_seed", 0, "Seed of the sampler: the same study again.", **own)
  flags.DEFINE_enum("pruner", "median", list(PRUNERS),
                    "Stops hopeless trials at an evaluation: median, hyperband, asha or none.",
                    **own)
  flags.DEFINE_string("objective", "accuracy", "What the study optimizes, on --select_split: "
                      "a metric of research/metrics.py (accuracy, loss, or one you add).", **own)
  flags.DEFINE_string("train_split", "train[:90%]", "The split trials train on.", **own)
  flags.DEFINE_string("select_split", "train[90%:]",
                      "The split trials are evaluated, pruned and chosen on.", **own)
  flags.DEFINE_string("test_split", "test", "The split only the chosen trial is evaluated on.",
                      **own)
  flags.DEFINE_string("storage", "", "Optuna storage: a database URL (postgresql://USER@HOST/DB) "
                      "or a journal file; default WORKDIR/study.journal.", **own)
  flags.DEFINE_string("study_name", "", "The study's name in the storage (default: the "
                      "folder's name).", **own)
  flags.DEFINE_integer("workers", 1, "Trials at once on this machine, each on its own devices.",
                       **own)
  flags.DEFINE_float("timeout", 0, "Seconds after which no new trial starts (0 = none).", **own)
  flags.DEFINE_float("heartbeat", 30, "Seconds between a running trial's heartbeats; a trial "
                     "silent for three is taken as dead and retried.", **own)
  flags.DEFINE_enum("launcher", "local", ["local", "slurm"],
                    "local: workers here; slurm: submit --array workers with sbatch.", **own)
  flags.DEFINE_integer("array", 0, "--launcher=slurm: how many array tasks (workers).", **own)
  flags.DEFINE_string("sbatch_args", "", "Extra sbatch options, e.g. '--time=2:00:00'.", **own)
  flags.DEFINE_bool("dry_run", False, "Check everything and print the plan; run nothing.", **own)


def main(argv: list[str], flag_values, command_line_args: list[str]):
  """absl's app.run calls this with the arguments left after the flags (argv[0], then
  those after '--'); `flag_values` were parsed from `command_line_args`."""
  from research.errors import UserError

  try:
    sys.exit(run(read_options(flag_values), argv[1:], command_line_args))
  except UserError as e:
    e.exit()


def _parse_flags(argv: list[str], flag_values) -> list[str]:
  from research.errors import UserError

  try:
    return parse_command_line(argv, flag_values)
  except UserError as e:
    e.exit()


if __name__ == "__main__":
  _define_flags(FLAGS)
  app.run(functools.partial(main, flag_values=FLAGS, command_line_args=sys.argv[1:]),
          flags_parser=functools.partial(_parse_flags, flag_values=FLAGS))
