"""One trial of a study: `python -m research.main` in the trial's workdir, watched.

A worker (research/studies/study.py) runs each trial as a child process on the devices
of its slot. While the child trains, `run` reads each new evaluation from the
child's metrics.jsonl and hands it to `report` (the study's pruner answers); when
told to stop it sends SIGTERM, and the trainer checkpoints and exits at the next
step boundary (train._PreemptionFlag): a pruned or interrupted trial keeps its
workdir and last checkpoint, and running it again resumes there.

The child dies with its worker: it is started through this module's `__main__`,
which asks the kernel for SIGTERM when the worker goes (prctl PR_SET_PDEATHSIG),
pins the slot's CPU cores, and then becomes `research.main` (exec). A worker
killed with SIGKILL therefore leaves a checkpointed workdir, not an orphan still
holding the workdir's lock.
"""

import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from research import backend
from research.errors import UserError

LOG_FILE = "trial.log"  # the child's stdout and stderr, every session appended


@dataclasses.dataclass(frozen=True)
class Slot:
  """The devices of one of a machine's K workers, decided once from --workers."""
  index: int
  env: dict  # set in the trainer's environment (CUDA_VISIBLE_DEVICES, thread counts)
  cpus: tuple[int, ...]  # CPU cores the trainer may run on; () = no restriction
  description: str


def visible_gpus(environ=os.environ) -> list[str]:
  """NVIDIA GPUs the trainers started with `environ` may use, without starting JAX (which
  would claim their memory); none when JAX will not run on GPUs there (JAX_PLATFORMS=cpu,
  or no CUDA plugin), whatever nvidia-smi shows."""
  if backend.planned_platform(environ) != "gpu":
    return []
  listed = environ.get("CUDA_VISIBLE_DEVICES")
  if listed is not None:
    return [gpu for gpu in (g.strip() for g in listed.split(",")) if gpu and gpu != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return []
  count = sum(line.startswith("GPU ") for line in result.stdout.splitlines())
  return [str(index) for index in range(count)]


def device_slots(workers: int, environ=os.environ) -> list[Slot]:
  """One slot per worker: whole GPUs each on a GPU machine, else a share of the CPU cores.
  `environ`: the trainers' environment (the study process itself keeps JAX on the CPU)."""
  if workers < 1:
    raise UserError(f"--workers={workers} is not accepted: a positive number of trials to run "
                    "at once on this machine.")
  gpus = visible_gpus(environ)
  if gpus:
    if workers > len(gpus):
      raise UserError(f"--workers={workers} needs a GPU each, but this machine shows "
                      f"{len(gpus)} ({','.join(gpus)}): use --workers={len(gpus)} or fewer.")
    per_worker = len(gpus) // workers
    slots = []
    for index in range(workers):
      mine = gpus[index * per_worker:(index + 1) * per_worker]
      slots.append(Slot(index, {"CUDA_VISIBLE_DEVICES": ",".join(mine)}, (),
                        f"GPU {','.join(mine)}"))
    return slots
  cores = sorted(os.sched_getaffinity(0))
  if workers == 1:
    return [Slot(0, {}, (), f"all {len(cores)} CPU cores")]
  if workers > len(cores):
    raise UserError(f"--workers={workers} needs a CPU core each, but this process may use "
                    f"{len(cores)}: use --workers={len(cores)} or fewer.")
  slots = []
  for index in range(workers):
    mine = tuple(cores[index * len(cores) // workers:(index + 1) * len(cores) // workers])
    threads = str(len(mine))
    # XLA's CPU client sizes its thread pool from the machine, not the affinity mask.
    env = {"OMP_NUM_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads,
           "TF_NUM_INTEROP_THREADS": "1"}
    slots.append(Slot(index, env, mine, f"CPU cores {','.join(map(str, mine))}"))
  return slots


@dataclasses.dataclass(frozen=True)
class Outcome:
  state: str  # "complete", "pruned", "failed" or "interrupted"
  evaluations: list[dict]  # the eval-split records of metrics.jsonl, in order
  reason: str = ""  # why a trial failed: the trainer's last message
  pruned_at: int = 0  # the evaluation (1, 2, ...) at which the pruner stopped it; 0: never


def evaluations(workdir: str) -> list[dict]:
  """The evaluation records (each names its split; research/run/run_log.py) written so far; a
  line still being written is not one yet."""
  from research.run import run_log

  try:
    return run_log.evaluations(run_log.read_records(os.path.join(workdir,
                                                                 run_log.METRICS_FILE)))
  except OSError:  # unreadable for now: the next poll looks again
    return []


def run(command: list[str], workdir: str, slot: Slot, report: Callable[[int, dict], bool],
        heartbeat: Callable[[], None], stop_requested: Callable[[], bool],
        poll_seconds: float = 1.0, base_env: dict | None = None) -> Outcome:
  """Runs `command` (research.main ... --workdir=workdir) on `slot` until it exits.

  `report(k, record)` gets the k-th evaluation (k = 1, 2, ...: trials are compared
  at the same evaluation) once, and returns True when the trial should be pruned:
  the child is then asked to checkpoint and exit, and the outcome is "pruned" at
  evaluation k (a verdict on the last evaluation, once training ended, changes
  nothing: the trial is complete). `heartbeat()` is called
  every poll; once `stop_requested()` the child is asked to checkpoint and exit, and
  the outcome is "interrupted", unless training had ended: then it stands as it ended.
  """
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, LOG_FILE)
  env = {**(base_env if base_env is not None else os.environ), **slot.env}
  wrapper = [sys.executable, "-m", "research.studies.study_trial", f"--parent={os.getpid()}",
             f"--cpus={','.join(map(str, slot.cpus))}", "--", *command]
  with open(log_path, "ab") as log:
    log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
    log.flush()
    session_start = log.tell()
    child = subprocess.Popen(wrapper, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)  # a terminal's Ctrl-C reaches it via us
  reported, pruned_at, stopping, ended = 0, 0, False, False
  try:
    while True:
      finished = child.poll() is not None
      records = evaluations(workdir)
      for ordinal in range(reported + 1, len(records) + 1):
        reported = ordinal
        last = _is_last_evaluation(workdir, records[ordinal - 1])
        # A verdict on the last evaluation comes after training ended: nothing is left to
        # save, and the trial is complete with its full result.
        if report(ordinal, records[ordinal - 1]) and not pruned_at and not last:
          pruned_at = ordinal
        # No stop signal after the last evaluation: it could only cut the final
        # checkpoint's write short; the trainer ends by itself.
        ended = ended or last
      if finished:
        break
      heartbeat()
      if (pruned_at or stop_requested()) and not stopping and not ended:
        stopping = True
        child.send_signal(signal.SIGTERM)
      # A stop that will be acted on wakes the loop; one after the end changes nothing.
      _until_next_poll(child, poll_seconds,
                       lambda: not stopping and not ended and stop_requested())
  except BaseException:
    child.send_signal(signal.SIGTERM)  # never leave a trainer behind
    raise
  status = child.returncode
  records = evaluations(workdir)
  signalled = status in (-signal.SIGTERM, 128 + signal.SIGTERM)
  # A trainer that finished is complete, or pruned if the pruner spoke first; a signal
  # that arrived after training ended (run.json says finished) changes nothing.
  if status == 0 or (signalled and _training_finished(workdir)):
    return Outcome("pruned" if pruned_at else "complete", records, pruned_at=pruned_at)
  if signalled and pruned_at:
    return Outcome("pruned", records, pruned_at=pruned_at)
  if signalled and stopping:  # not pruned: the worker was told to stop
    return Outcome("interrupted", records, "stopped by a signal to its worker")
  return Outcome("failed", records, _failure_reason(log_path, session_start, status))


def _until_next_poll(child, seconds: float, stop_requested: Callable[[], bool]) -> None:
  """Waits `seconds`, or less: a trainer that exits or a stop request ends the wait within
  50 ms, so the next trial starts, or the stop reaches the trainer, at once."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and child.poll() is None and not stop_requested():
    time.sleep(0.05)


def _is_last_evaluation(workdir: str, record: dict) -> bool:
  """Whether `record` is the evaluation at the run's last step (from config.json)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    step, epoch = int(record["step"]), float(record["epoch"])
    if config.get("num_train_steps"):
      return step >= int(config["num_train_steps"])
    # epoch = step / steps_per_epoch, rounded to 4 decimals in metrics.jsonl.
    return epoch > 0 and epoch >= float(config["num_epochs"]) - 0.5 * epoch / step - 1e-4
  except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
    return False


def _training_finished(workdir: str) -> bool:
  try:
    with open(os.path.join(workdir, "run.json")) as f:
      return json.load(f).get("status") == "finished"
  except (OSError, ValueError, AttributeError):
    return False


def _failure_reason(log_path: str, session_start: int, status: int) -> str:
  """The trainer's own last words: its 'Training stopped: ...' line, else its last line."""
  with open(log_path, "rb") as f:
    f.seek(session_start)
    lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()
             if line.strip()]
  stopped = [line for line in lines if "Training stopped" in line]
  last = (stopped or lines or [""])[-1]
  last = last.split("] ", 1)[-1] if last[:1] in "IWEF" and "] " in last else last
  return f"exit status {status}: {last.removeprefix('error: ')[:500]}"


def _become_trainer(argv: list[str]) -> None:
  """`python -m research.studies.study_trial --parent=PID --cpus=0,1 -- COMMAND...`: the
  kernel sends SIGTERM when the worker dies, the cores are pinned, then COMMAND runs."""
  separator = argv.index("--")
  options = dict(arg[2:].split("=", 1) for arg in argv[1:separator])
  command = argv[separator + 1:]
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(options["parent"]):  # the worker died before prctl took effect
      sys.exit(128 + signal.SIGTERM)
  if options.get("cpus"):
    os.sched_setaffinity(0, {int(core) for core in options["cpus"].split(",")})
  os.execvp(command[0], command)


if __name__ == "__main__":
  _become_trainer(sys.argv)
