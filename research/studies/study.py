"""Hyperparameter studies on Optuna: the study, its storage, and the worker loop.

A study lives in a folder (STUDY_DIR): its Optuna storage (by default the journal
file STUDY_DIR/study.journal; or any Optuna RDB URL such as PostgreSQL, or a journal
file on shared storage, for workers on many machines), one workdir per trial
under STUDY_DIR/trials/, and the results (research/studies/study_results.py).

Exactly once. The study's creator enqueues its N trials up front as waiting
trials (a grid: one per point; random and TPE: empty ones whose parameters the
sampler picks when a worker claims them, from the history so far). A worker
claims a waiting trial atomically (Optuna's own state change WAITING -> RUNNING),
so two workers never run the same trial, and the study has exactly N trials
however many workers join. (Optuna's GridSampler picks points at ask time and
re-evaluates points when workers race; enqueuing each point once does not.)

Nothing lost. A running trial's worker beats a heartbeat (Optuna's RDB
heartbeat; a system attribute of the trial on a journal storage). A trial whose
heartbeat stops (its worker was killed) is failed by the next worker that looks,
and RetryHeartbeatStaleTrialCallback enqueues a copy with the same parameters and user
attributes, hence the same workdir: the copy resumes from the last checkpoint.
A trial interrupted by a signal to its worker is retried the same way. A
diverging trial (the trainer exits 1: non-finite loss) is failed with the
trainer's message and the study goes on.

Honest selection. Trials train on `train_split` and report on `select_split`
(by default train[:90%] / train[90%:]); only the chosen trial is evaluated on
`test_split`, once, by the worker that finds the study done (under a file lock
in STUDY_DIR).
"""

import dataclasses
import fcntl
import os
import socket
import subprocess
import threading
import time
import warnings

from absl import logging

from research import metrics
from research.config import command_line
from research.errors import UserError
from research.run import run_log
from research.studies import search_space, study_trial

JOURNAL_FILE = "study.journal"
TRIALS_DIR = "trials"
SLOT_ATTR = "slot"  # user attribute: which of the study's N trials (names its workdir)
HEARTBEAT_ATTR = "heartbeat"  # system attribute on journal storages: the last beat (epoch s)
TEST_ATTR = "test_result"  # study user attribute: the chosen trial's test evaluation
OBJECTIVES = metrics.DIRECTIONS  # every registered metric, and which way is better


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a worker needs, decided once from the command line."""
  root: str  # STUDY_DIR
  config_file: str
  params: tuple  # search_space.Param
  search: str  # grid | random | tpe
  trials: int
  sampler_seed: int
  pruner: str  # median | hyperband | asha | none
  storage: str  # "" = the journal file in root
  study_name: str
  fixed: tuple[str, ...]  # --config.FIELD=VALUE given to every trial (splits included)
  train_split: str
  select_split: str
  test_split: str
  objective: str  # accuracy | loss
  heartbeat_seconds: float = 30.0
  timeout_seconds: float = 0.0  # 0 = none: no new trial starts after this many seconds
  poll_seconds: float = 1.0

  def spec(self) -> dict:
    """What makes two commands the same study (a rerun must match it)."""
    return {"config": self.config_file, "space": [p.describe() for p in self.params],
            "search": self.search, "trials": self.trials, "fixed": list(self.fixed),
            "objective": self.objective, "sampler_seed": self.sampler_seed,
            "splits": [self.train_split, self.select_split, self.test_split]}

  def trial_workdir(self, slot: int) -> str:
    return os.path.join(self.root, TRIALS_DIR, f"trial-{slot:04d}")


def split_flags(train_split: str, select_split: str) -> list[str]:
  return [f"--config.dataset.train_split={train_split}",
          f"--config.dataset.eval_split={select_split}"]


# ---- Storage, sampler, pruner ----------------------------------------------------------

def make_storage(plan: Plan):
  """The Optuna storage named by --storage (a database URL or a journal file), by default
  the journal file in the study folder (nothing to start): research/studies/study_storage.py."""
  from research.studies import study_storage

  if study_storage.is_url(plan.storage):
    return study_storage.open_database(plan.storage, plan.heartbeat_seconds)
  return study_storage.open_journal(plan.storage or os.path.join(plan.root, JOURNAL_FILE))


def trial_seed(sampler_seed: int, number: int) -> int:
  """The sampler's seed for trial `number`: workers in other processes (another machine, a
  SLURM array task) sample other points, and a study with the same --sampler_seed samples
  the same ones again."""
  import numpy as np

  return int(np.random.SeedSequence([sampler_seed, number]).generate_state(1)[0])


def make_sampler(plan: Plan, seed: int | None = None):
  import optuna

  seed = plan.sampler_seed if seed is None else seed
  if plan.search == "tpe":
    # constant_liar: parallel workers do not all sample the same promising point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      n_startup_trials=min(10, max(2, plan.trials // 3)))
  # A grid's trials come with every parameter fixed (enqueued), so nothing is sampled.
  return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str):
  import optuna

  if name == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
  if name == "hyperband":
    return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
  if name == "asha":
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
  return optuna.pruners.NopPruner()


class _Heartbeat:
  """Beats for running trials and fails the stale ones (their worker died), retrying them."""

  def __init__(self, storage, study_id: int, seconds: float):
    import optuna

    self.storage, self.study_id, self.seconds = storage, study_id, seconds
    self.native = isinstance(storage, optuna.storages.RDBStorage)  # Optuna's own heartbeat
    self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    self._last = {}

  def beat(self, trial_id: int) -> None:
    now = time.time()
    if now - self._last.get(trial_id, 0.0) < self.seconds:
      return
    self._last[trial_id] = now
    if self.native:
      self.storage.record_heartbeat(trial_id)
    else:
      self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, now)

  def fail_stale(self, study) -> list[int]:
    """Fails trials nobody has beaten for three beats; their retries wait for a worker."""
    import optuna

    if self.native:
      optuna.storages.fail_stale_trials(study)
      return []
    failed = []
    now = time.time()
    for trial in self.storage.get_all_trials(self.study_id, deepcopy=False,
                                             states=(optuna.trial.TrialState.RUNNING,)):
      last = trial.system_attrs.get(HEARTBEAT_ATTR, trial.datetime_start.timestamp())
      if now - last <= 3 * self.seconds:
        continue
      trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id,
                                                                      trial.number)
      try:
        if self.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
          self.retry(study, self.storage.get_trial(trial_id))
          failed.append(trial.number)
      except optuna.exceptions.UpdateFinishedTrialError:
        pass  # another worker failed it first
    return failed


# ---- The study -------------------------------------------------------------------------

class Study:
  """An open study: the Optuna study, its storage and heartbeat, shared by a machine's workers."""

  def __init__(self, plan: Plan, storage=None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # "Experimental" notices (TPE's constant_liar, the retry callback): the versions are pinned.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    self.plan = plan
    self.storage = storage or make_storage(plan)
    direction = OBJECTIVES[plan.objective]
    sampler, pruner = make_sampler(plan), make_pruner(plan.pruner)
    try:
      self.optuna = optuna.create_study(storage=self.storage, study_name=plan.study_name,
                                        sampler=sampler, pruner=pruner, direction=direction)
      self._enqueue_trials()
    except optuna.exceptions.DuplicatedStudyError:
      self.optuna = optuna.load_study(study_name=plan.study_name, storage=self.storage,
                                      sampler=sampler, pruner=pruner)
      self._check_same_study()
    self.study_id = self.storage.get_study_id_from_name(plan.study_name)
    self.heartbeat = _Heartbeat(self.storage, self.study_id, plan.heartbeat_seconds)
    self.lock = threading.Lock()  # the workers of this process: one test evaluation at a time

  def _enqueue_trials(self) -> None:
    """The creator enqueues all N trials, then marks the study ready for other workers."""
    if self.plan.search == "grid":
      points = search_space.grid_points(list(self.plan.params))
    else:
      points = [{}] * self.plan.trials  # parameters sampled when claimed
    for slot, point in enumerate(points):
      self.optuna.enqueue_trial(point, user_attrs={SLOT_ATTR: slot})
    self.optuna.set_user_attr("spec", self.plan.spec())

  def _check_same_study(self) -> None:
    deadline = time.monotonic() + 120
    while "spec" not in self.optuna.user_attrs:  # its creator is still enqueuing
      if time.monotonic() > deadline:
        raise UserError(f"Study {self.plan.study_name!r} in {self.plan.storage or self.plan.root}"
                        " was never set up (its creator stopped?): use another --study_name.")
      time.sleep(0.5)
    stored, given = self.optuna.user_attrs["spec"], self.plan.spec()
    changed = [f"{key}: {stored.get(key)!r} in the study, {given[key]!r} now"
               for key in given if stored.get(key) != given[key]]
    if changed:
      raise UserError(f"Study {self.plan.study_name!r} was started with other settings ("
                      + "; ".join(changed) + "). Rerun its own command to resume it, or give "
                      "another study folder (or --study_name).")

  # ---- Claiming and running trials ----

  def claim(self):
    """A waiting trial, now running for us (an optuna.Trial), or None.

    This is `Study.ask()` without its fallback of creating a new trial when none waits,
    which would let racing workers exceed the study's N trials: Optuna's own atomic
    WAITING -> RUNNING claim, through the study's (cached) storage so that the
    Trial's later calls find it. The trial samples with a sampler of its own, seeded
    from the study's seed and its number (trial_seed).
    """
    import optuna

    trial_id = self.optuna._pop_waiting_trial_id()  # noqa: SLF001 -- optuna 4.9, pinned
    if trial_id is None:
      return None
    number = self.storage.get_trial(trial_id).number
    # The study's own (on a database, cached) storage: the one that knows the claim.
    own = optuna.load_study(study_name=self.plan.study_name,
                            storage=self.optuna._storage,  # noqa: SLF001 -- optuna 4.9, pinned
                            sampler=make_sampler(self.plan,
                                                 trial_seed(self.plan.sampler_seed, number)),
                            pruner=self.optuna.pruner)
    return optuna.Trial(own, trial_id)

  def count(self, *states) -> int:
    return len(self.storage.get_all_trials(self.study_id, deepcopy=False, states=states))

  def run_trial(self, trial, slot: study_trial.Slot, stop: threading.Event,
                base_env: dict) -> str:
    """Suggests the trial's parameters, trains it, and tells the study how it ended."""
    import optuna

    plan = self.plan
    values = {param.key: _suggest(trial, param) for param in plan.params}
    slot_number = trial.user_attrs.get(SLOT_ATTR, trial.number)
    workdir = plan.trial_workdir(slot_number)
    trial.set_user_attr("workdir", os.path.relpath(workdir, plan.root))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:{slot.description}")
    command = command_line.main_command(plan.config_file, workdir,
                                        [*plan.fixed, *command_line.override_flags(values)])
    trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
    name = f"trial {trial.number} (slot {slot_number}, {slot.description})"
    print(f"{name}: {', '.join(f'{k}={command_line.flag_value(v)}' for k, v in values.items())}"
          f" -> {workdir}", flush=True)

    lost = threading.Event()  # another worker took this trial for dead (a missed heartbeat)

    def report(ordinal: int, record: dict) -> bool:
      try:
        trial.report(float(record[plan.objective]), ordinal)
        return trial.should_prune()
      except optuna.exceptions.UpdateFinishedTrialError:
        lost.set()
        return True  # stop the trainer: the trial's retry owns the workdir now

    outcome = study_trial.run(command, workdir, slot, report,
                              heartbeat=lambda: self.heartbeat.beat(trial_id),
                              stop_requested=lambda: stop.is_set() or lost.is_set(),
                              poll_seconds=plan.poll_seconds, base_env=base_env)
    last = run_log.final_evaluation(outcome.evaluations)
    if lost.is_set() or self.storage.get_trial(trial_id).state.is_finished():
      print(f"{name}: was taken for dead by another worker (missed heartbeats) and is retried "
            "there; this worker stopped its trainer.", flush=True)
      return "lost"
    if outcome.state == "complete" and last:
      trial.study.tell(trial, float(last[plan.objective]))
    elif outcome.state == "pruned":
      trial.set_user_attr("pruned_at_evaluation", outcome.pruned_at)
      trial.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
      reason = outcome.reason or "the trainer finished without an evaluation"
      trial.set_user_attr("failure", reason)
      trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
      if outcome.state == "interrupted":  # resumes from its checkpoint on the next run
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)(
            self.optuna, self.storage.get_trial(trial_id))
    at = outcome.pruned_at if outcome.state == "pruned" else len(outcome.evaluations)
    where = f" at evaluation {at}" if at else ""
    value = f", {plan.objective} {last[plan.objective]:.4f}" if last else ""
    print(f"{name}: {outcome.state}{where}{value}"
          f"{': ' + outcome.reason if outcome.reason else ''}", flush=True)
    return outcome.state

  # ---- The end: the chosen trial on the test split ----

  def best_trial(self):
    import optuna

    complete = self.storage.get_all_trials(self.study_id,
                                           states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
      return None
    sign = 1 if OBJECTIVES[self.plan.objective] == "maximize" else -1
    return max(complete, key=lambda t: (sign * t.value, -t.number))

  def evaluate_best_on_test(self, base_env: dict) -> dict | None:
    """Evaluates the chosen trial's final checkpoint on the test split, once per choice."""
    plan = self.plan
    best = self.best_trial()
    if best is None or plan.test_split == plan.select_split:
      return None
    with self.lock, open(os.path.join(plan.root, "test_evaluation.lock"), "w") as lock_file:
      fcntl.flock(lock_file, fcntl.LOCK_EX)  # workers of other processes and machines
      done = self.storage.get_study_user_attrs(self.study_id).get(TEST_ATTR)
      if done and done.get("trial") == best.number:
        return done
      workdir = os.path.join(plan.root, best.user_attrs["workdir"])
      print(f"Chosen: trial {best.number} ({plan.objective} {best.value:.4f} on "
            f"{plan.select_split}); evaluating it on {plan.test_split}, once.", flush=True)
      command = command_line.main_command(
          plan.config_file, workdir, command_line.override_flags(
              {"eval.split": plan.test_split, "eval.checkpoint_step": "latest"}), mode="eval")
      # On the devices of one worker: those the trial trained on.
      result = subprocess.run(command, capture_output=True, text=True, env=base_env)
      if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no output"]
        raise UserError(f"Evaluating the chosen trial {best.number} on {plan.test_split} "
                        f"failed (exit status {result.returncode}): {lines[-1]}")
      results = os.path.join(workdir, run_log.EVAL_FILE)
      record = run_log.final_evaluation(run_log.read_records(results), plan.test_split)
      if not record:
        raise UserError(f"Evaluating the chosen trial {best.number} on {plan.test_split} "
                        f"wrote no result for it to {results}.")
      done = {"trial": best.number, "split": plan.test_split, "step": record["step"],
              **{name: record.get(name) for name in metrics.METRICS},  # every metric
              "num_examples": record["num_examples"]}
      self.optuna.set_user_attr(TEST_ATTR, done)
      print(f"Test ({plan.test_split}): accuracy {done['accuracy']:.4f}, loss "
            f"{done['loss']:.4f} on {done['num_examples']} examples.", flush=True)
      return done


def _suggest(trial, param: search_space.Param):
  if param.kind == "loguniform":
    return trial.suggest_float(param.key, param.low, param.high, log=True)
  if param.kind == "uniform":
    return trial.suggest_float(param.key, param.low, param.high)
  if param.kind == "int":
    return trial.suggest_int(param.key, int(param.low), int(param.high), step=param.step)
  return trial.suggest_categorical(param.key, list(param.values))


# ---- Workers -----------------------------------------------------------------------------

def work(study: Study, slot: study_trial.Slot, stop: threading.Event, deadline: float | None,
         base_env: dict) -> None:
  """One worker: claims and runs trials until none is left (or the time is up, or stop)."""
  while not stop.is_set():
    study.heartbeat.fail_stale(study.optuna)
    if deadline is not None and time.monotonic() > deadline:
      print(f"Worker {slot.index}: the study's time is up; no new trial.", flush=True)
      return
    trial = study.claim()
    if trial is None:
      import optuna

      if study.count(optuna.trial.TrialState.RUNNING) == 0:
        return  # nothing waits and nothing runs: the study is done
      stop.wait(study.plan.poll_seconds)  # another worker's trial may yet fail and be retried
      continue
    study.run_trial(trial, slot, stop, base_env)


def run_workers(study: Study, slots: list[study_trial.Slot], stop: threading.Event,
                base_env: dict) -> None:
  """Runs one worker per slot in this process (threads: the trainers are child processes)."""
  deadline = (time.monotonic() + study.plan.timeout_seconds
              if study.plan.timeout_seconds > 0 else None)
  errors = []

  def worker(slot):
    try:
      work(study, slot, stop, deadline, base_env)
    except BaseException as e:  # noqa: BLE001 -- reported once all workers are done
      errors.append(e)
      stop.set()

  threads = [threading.Thread(target=worker, args=(slot,), name=f"worker-{slot.index}")
             for slot in slots]
  for thread in threads:
    thread.start()
    time.sleep(0.2 if len(threads) > 1 else 0)  # staggered: TPE sees the previous claim
  for thread in threads:
    while thread.is_alive():
      thread.join(0.5)  # keeps the main thread free for signal handlers
  if errors:
    logging.error("A worker failed: %r", errors[0])
    raise errors[0]
