"""Hyperparameter sweeps: every combination of some config values, one workdir each.

  python -m launch.sweep --config=configs/default.py --workdir=runs/sweep1 \\
      --sweep='optimizer.name=adam,sgd;optimizer.learning_rate=1e-3,3e-4' \\
      -- --config.num_epochs=2

`--sweep` (or `--sweep_file`, one `key=v1,v2,...` axis per line) names config
fields and their values; the sweep is their Cartesian product. Each member
trains into WORKDIR/<key=value,...> with `python -m research.main`; flags after
`--` go to every member. Locally the members run one after another; with
`--launcher=slurm` each is submitted as `sbatch launch/slurm.sbatch ARGS`.

Running the same command again resumes the sweep: finished members (run.json
says so) are skipped, an interrupted one resumes from its last checkpoint.
SIGINT/SIGTERM are passed on to the running member, which checkpoints and
exits; the sweep then stops. At the end (and when stopped) WORKDIR/results.csv
and results.md list every member, best first by `--metric`, beside
results_curves.png, their overlaid learning curves.
"""

import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

from absl import app, flags

from research import report, run_info
from research.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_SCRIPT = os.path.join(REPO, "launch", "slurm.sbatch")
STATE_FILE = "sweep.json"

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Member:
  name: str
  overrides: tuple[tuple[str, str], ...]  # (config key, value as typed)

  def flags(self) -> list[str]:
    return [f"--config.{key}={value}" for key, value in self.overrides]


def parse_axes(text: str, source: str = "--sweep") -> list[tuple[str, list[str]]]:
  """'a.b=1,2;c=x,y' (or one axis per line, # comments) -> [(key, values)]."""
  axes = []
  for part in re.split(r"[;\n]", text):
    part = part.split("#", 1)[0].strip()
    if not part:
      continue
    key, equals, values = part.partition("=")
    key = key.strip().removeprefix("--config.").removeprefix("config.")
    values = [value.strip() for value in values.split(",")]
    if not equals or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not all(values):
      raise UserError(f"{source}: {part!r} is not an axis. Accepted: KEY=VALUE1,VALUE2,... with "
                      "a config field as KEY, e.g. optimizer.learning_rate=1e-3,3e-4; axes are "
                      "separated by ';' (or by lines in --sweep_file).")
    if key in (axis[0] for axis in axes):
      raise UserError(f"{source}: {key} is given twice; list all its values in one axis.")
    axes.append((key, values))
  if not axes:
    raise UserError(f"{source} names no axis; e.g. --sweep='optimizer.name=adam,sgd'.")
  return axes


def members(axes: list[tuple[str, list[str]]]) -> list[Member]:
  """The Cartesian product, in order; names like 'optimizer.name=adam,seed=1'."""
  keys = [key for key, _ in axes]
  found = []
  for values in itertools.product(*(values for _, values in axes)):
    overrides = tuple(zip(keys, values))
    name = ",".join(f"{key}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}" for key, value in overrides)
    found.append(Member(name, overrides))
  names = [member.name for member in found]
  if len(set(names)) != len(names):
    raise UserError("Two sweep members would share a workdir name: give values that differ in "
                    "letters, digits or . _ + -.")
  return found


def is_finished(workdir: str) -> bool:
  return (run_info.read(workdir) or {}).get("status") == "finished"


class _Forwarder:
  """Passes SIGINT/SIGTERM to the running member (in its own session, so a
  terminal's Ctrl-C reaches it once, through us) and remembers the sweep must stop."""

  def __init__(self):
    self.child = None
    self.signal = None

  def __enter__(self):
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT,
                                                                         signal.SIGTERM)}
    return self

  def _handle(self, signum, frame):
    self.signal = signum
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_local(config: str, root: str, todo: list[Member], extra: list[str]) -> int:
  """Trains the members one after another; returns the sweep's exit status."""
  with _Forwarder() as forwarder:
    for index, member in enumerate(todo, 1):
      workdir = os.path.join(root, member.name)
      if is_finished(workdir):
        print(f"[{index}/{len(todo)}] {member.name}: finished earlier, skipped", flush=True)
        continue
      if forwarder.signal is not None:  # arrived between two members
        return 128 + forwarder.signal
      print(f"[{index}/{len(todo)}] {member.name}: training in {workdir}", flush=True)
      command = [sys.executable, "-m", "research.main", f"--config={config}",
                 f"--workdir={workdir}", *member.flags(), *extra]
      forwarder.child = subprocess.Popen(command, start_new_session=True)
      status = forwarder.child.wait()
      forwarder.child = None
      if forwarder.signal is not None:
        name = signal.Signals(forwarder.signal).name
        print(f"Sweep stopped by {name} during {member.name}; run the same command to resume.",
              flush=True)
        return 128 + forwarder.signal
      if status == 2:  # a user error applies to every member: stop at the first
        print(f"{member.name} refused its config (exit status 2, message above); sweep stopped.",
              flush=True)
        return 2
      if status != 0:
        print(f"{member.name} failed (exit status {status}); going on with the next member.",
              flush=True)
  return 0


def run_slurm(config: str, root: str, todo: list[Member], extra: list[str], sbatch_args: str,
              state: dict) -> int:
  """Submits every unfinished member not already queued; the table is written now and
  again by any later run of the same command."""
  jobs = state.setdefault("jobs", {})
  for member in todo:
    workdir = os.path.join(root, member.name)
    if is_finished(workdir):
      print(f"{member.name}: finished earlier, skipped", flush=True)
      continue
    if member.name in jobs and _job_queued(jobs[member.name]):
      print(f"{member.name}: job {jobs[member.name]} is still queued or running", flush=True)
      continue
    os.makedirs(workdir, exist_ok=True)
    command = ["sbatch", f"--job-name={os.path.basename(root)}:{member.name}",
               f"--output={os.path.join(workdir, 'slurm-%j.out')}", *shlex.split(sbatch_args),
               SLURM_SCRIPT, f"--config={config}", f"--workdir={workdir}", *member.flags(), *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise UserError(f"sbatch refused {member.name} (exit status {result.returncode}): "
                      f"{result.stderr.strip() or result.stdout.strip()}")
    job = re.search(r"\d+", result.stdout)
    jobs[member.name] = job.group(0) if job else result.stdout.strip()
    print(f"{member.name}: submitted as job {jobs[member.name]}", flush=True)
  return 0


def check_slurm() -> None:
  if shutil.which("sbatch") is None:
    raise UserError("--launcher=slurm needs SLURM's `sbatch`, which is not on PATH here. Run "
                    "the sweep on the cluster's login node, or use --launcher=local.")
  if not os.path.exists(SLURM_SCRIPT):
    raise UserError(f"{SLURM_SCRIPT} is missing: the slurm launcher submits through it.")


def _job_queued(job_id: str) -> bool:
  if shutil.which("squeue") is None:
    return False
  result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"],
                          capture_output=True, text=True)
  return result.returncode == 0 and bool(result.stdout.strip())


def write_results(root: str, todo: list[Member], metric: str) -> list[dict]:
  """results.csv / results.md (best first by `metric`) and the overlaid curves."""
  workdirs = [os.path.join(root, member.name) for member in todo]
  rows = report.sort_rows([_result_row(member, workdir) for member, workdir in
                           zip(todo, workdirs)], metric)
  report.write_table(rows, os.path.join(root, "results.csv"), os.path.join(root, "results.md"),
                     f"Sweep {root}, best first by {metric}")
  curves = {member.name: report.with_wall_time(run_info.read_metrics(workdir))
            for member, workdir in zip(todo, workdirs)}
  curves = {name: records for name, records in curves.items() if records}
  if curves:
    report.plot_learning_curves(curves, os.path.join(root, "results_curves.png"))
  return rows


def _result_row(member: Member, workdir: str) -> dict:
  row = report.summary_row(workdir)
  row.pop("workdir")
  return {"member": member.name, **dict(member.overrides), **row}


def _write_state(root: str, state: dict) -> None:
  path = os.path.join(root, STATE_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(state, f, indent=2)
  os.replace(path + ".tmp", path)


def sweep(argv) -> int:
  if not FLAGS.config or not FLAGS.workdir:
    raise UserError("--config and --workdir are required, e.g. --config=configs/default.py "
                    "--workdir=runs/sweep1.")
  if bool(FLAGS.sweep) == bool(FLAGS.sweep_file):
    raise UserError("Give exactly one of --sweep='key=v1,v2;...' and --sweep_file=FILE.")
  if FLAGS.sweep_file:
    try:
      with open(FLAGS.sweep_file) as f:
        axes = parse_axes(f.read(), FLAGS.sweep_file)
    except OSError as e:
      raise UserError(f"--sweep_file={FLAGS.sweep_file!r} cannot be read: {e}") from e
  else:
    axes = parse_axes(FLAGS.sweep)
  report.sort_rows([], FLAGS.metric)  # checks the metric's name before any training
  todo = members(axes)
  extra = argv[1:]
  root = FLAGS.workdir
  if FLAGS.dry_run:
    for member in todo:
      print(shlex.join(["python", "-m", "research.main", f"--config={FLAGS.config}",
                        f"--workdir={os.path.join(root, member.name)}", *member.flags(), *extra]))
    return 0
  if FLAGS.launcher == "slurm":
    check_slurm()
  os.makedirs(root, exist_ok=True)
  state = {"config": FLAGS.config, "axes": dict(axes), "extra_args": extra,
           "members": [member.name for member in todo],
           "jobs": ((_read_state(root) or {}).get("jobs") or {})}
  _write_state(root, state)
  print(f"Sweep of {len(todo)} members into {root} ({FLAGS.launcher}).", flush=True)
  if FLAGS.launcher == "slurm":
    status = run_slurm(FLAGS.config, root, todo, extra, FLAGS.sbatch_args, state)
    _write_state(root, state)
  else:
    status = run_local(FLAGS.config, root, todo, extra)
  rows = write_results(root, todo, FLAGS.metric)
  finished = sum(row["status"] == "finished" for row in rows)
  print(f"{finished} of {len(rows)} members finished. Results: "
        f"{os.path.join(root, 'results.md')} (and .csv)", flush=True)
  return status


def _read_state(root: str) -> dict | None:
  try:
    with open(os.path.join(root, STATE_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _define_flags() -> None:
  """Flags of the command line only, so that importing this module defines none."""
  flags.DEFINE_string("config", None, "Config file (as for research.main), e.g. "
                      "configs/default.py or configs/default.py:smoke.")
  flags.DEFINE_string("workdir", None, "Root folder: one workdir per member inside.")
  flags.DEFINE_string("sweep", "", "Axes: 'key=v1,v2;key2=v3,v4'.")
  flags.DEFINE_string("sweep_file", "", "A file with one 'key=v1,v2' axis per line.")
  flags.DEFINE_enum("launcher", "local", ["local", "slurm"],
                    "local: one member after another here; slurm: sbatch each.")
  flags.DEFINE_string("metric", "final_test_accuracy",
                      f"Sort the results by: {', '.join(report.METRICS)}.")
  flags.DEFINE_string("sbatch_args", "",
                      "Extra sbatch options, e.g. '--nodes=2 --time=2:00:00'.")
  flags.DEFINE_bool("dry_run", False, "List the members and their commands only.")


def main(argv):
  try:
    sys.exit(sweep(argv))
  except UserError as e:
    e.exit()


if __name__ == "__main__":
  _define_flags()
  app.run(main)
