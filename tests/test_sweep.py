"""launch.sweep's command line: search spaces, refusals before anything is written, SLURM."""

import json
import os
import re
import subprocess
import sys

import pytest

from research.errors import UserError
from research.studies import search_space

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/default.py:smoke"
# ml_collections loads config files with the deprecated load_module, once per in-process parse.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
# 10 steps between two stops, as in every study test: one compiled train loop for them all.
TINY = ["--config.num_train_steps=10", "--config.eval_every_steps=10",
        "--config.log_every_steps=10"]


def test_space_entries_of_every_kind():
  params = search_space.parse(
      "optimizer.learning_rate=loguniform(1e-4,3e-2); batch_size=choice(32,64,128)\n"
      "model.conv_features=choice((16, 32),(32, 64))  # widths\n"
      "--config.num_epochs=int(2,10,step=4)\n"
      "optimizer.name=adam,sgd\naugment.flip=choice(true,false);label_smoothing=uniform(0,0.2)")
  kinds = {p.key: p for p in params}
  assert kinds["optimizer.learning_rate"] == search_space.Param(
      "optimizer.learning_rate", "loguniform", low=1e-4, high=3e-2)
  assert kinds["batch_size"].values == ("32", "64", "128")
  assert kinds["model.conv_features"].values == ("(16, 32)", "(32, 64)")  # tuples stay whole
  assert kinds["num_epochs"].grid_values() == (2, 6, 10)
  assert kinds["optimizer.name"].kind == "grid" and kinds["optimizer.name"].values == (
      "adam", "sgd")
  assert kinds["label_smoothing"].describe() == "label_smoothing=uniform(0,0.2)"
  assert search_space.probe_values(kinds["num_epochs"]) == ["2", "10"]
  # Today's sweep syntax is a grid, in order.
  grid = search_space.grid_points(search_space.parse("optimizer.name=adam,sgd;seed=0,1"))
  assert grid == [{"optimizer.name": "adam", "seed": "0"}, {"optimizer.name": "adam", "seed": "1"},
                  {"optimizer.name": "sgd", "seed": "0"}, {"optimizer.name": "sgd", "seed": "1"}]
  with pytest.raises(UserError, match="needs finite values.*loguniform"):
    search_space.grid_points(params)


@pytest.mark.parametrize("text, message", [
    ("", "names no field"),
    ("optimizer.learning_rate", "is not a search-space entry"),
    ("=1,2", "is not a search-space entry"),
    ("seed=1,,2", "empty value"),
    ("seed=1;seed=2", "given twice"),
    ("lr=logunifrom(1,2)", "is not a kind of search space; kinds: loguniform"),
    ("optimizer.learning_rate=loguniform(0,1)", "needs LOW > 0"),
    ("optimizer.learning_rate=uniform(1,1)", "LOW must be below HIGH"),
    ("num_epochs=int(1,x)", "must be integers"),
    ("num_epochs=int(1,9,step=0)", "step must be a positive integer"),
    ("num_epochs=int(1)", "takes LOW,HIGH"),
    ("seed=choice(1,2", "unbalanced parentheses"),
])
def test_malformed_spaces_say_what_is_accepted(text, message):
  with pytest.raises(UserError, match=message) as error:
    search_space.parse(text)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("optimizer.learning_rat=loguniform(1e-4,1e-2)",
     "optimizer.learning_rat is not a field of configs/default.py:smoke: config.optimizer has no "
     "field 'learning_rat'. Did you mean --config.optimizer.learning_rate"),
    ("model.width=int(16,64,step=16)", "model.width is not a field.*config.model has no field "
                                       "'width'"),
    ("batch_size=choice(32,0)", "the value 0 is refused: --config.batch_size=0 is not accepted"),
    ("optimizer.learning_rate=uniform(-1,1e-2)", "the value -1.0 is refused"),
    ("model.name=choice(cnn,resnet2)", "the value resnet2 is refused: --config.model.name="
                                       "'resnet2' is not accepted: one of 'cnn', 'mlp'"),
    ("augment.flip=choice(true,maybe)", "the value maybe is refused"),
])
def test_values_the_config_refuses_are_found_before_any_trial(text, message):
  with pytest.raises(UserError, match=message) as error:
    search_space.check(search_space.parse(text), SMOKE, [])
  assert "\n" not in str(error.value)


def _sweep(root, *flags, env=None):
  command = [sys.executable, "-m", "launch.sweep", f"--config={SMOKE}", f"--workdir={root}",
             *flags]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


def run_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
  """`python -m launch.sweep ARGS` through the command's own flag parser and `main`, in this
  process, from the repository root: (exit status, stdout, stderr). A process costs 3-4
  CPU-seconds of imports and set-up; the real program's refusals (`error: ...`, status 2)
  are tested as processes below and in test_study.py."""
  from absl import flags

  from launch import sweep

  monkeypatch.chdir(REPO)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # main sets it; restored after the test
  monkeypatch.setattr(sweep.logging, "set_verbosity", lambda level: None)  # the test's own
  defined = flags.FlagValues()
  sweep._define_flags(defined)
  with pytest.raises(SystemExit) as exited:
    sweep.main(sweep._parse_flags(["launch.sweep", *args], defined), defined, args)
  captured = capsys.readouterr()
  return exited.value.code, captured.out, captured.err


@pytest.mark.parametrize("flags, message", [
    (["--space=optimizer.learning_rate=loguniform(1e-4,3e-2);batch_size=choice(32,0)",
      "--trials=3"], r"Search space batch_size=choice\(32,0\): the value 0 is refused: --config.batch_size=0"),
    (["--space=seed=int(0,3", "--trials=2"], "'seed=int\\(0,3' has unbalanced parentheses"),
    (["--sweep=seed=0,1", "--search=grid", "--trials=3"], "the grid has 2 points"),
    (["--space=optimizer.learning_rate=loguniform(1e-4,3e-2)"], "needs --trials=N"),
    (["--sweep=seed=0,1", "--", "--workdir=x"], "only --config.FIELD=VALUE flags"),
    (["--sweep=seed=0,1", "--test_split=tset"], "--test_split='tset': Split 'tset' of fashion_mnist"),
])
def test_a_bad_study_is_refused_in_one_line_and_writes_nothing(tmp_path, flags, message,
                                                               monkeypatch, capsys):
  status, _, stderr = run_in_process(
      [f"--config={SMOKE}", f"--workdir={tmp_path / 'study'}", *flags], monkeypatch, capsys)
  assert status == 2, stderr[-2000:]
  assert stderr.strip().splitlines()[-1].startswith("error: ")
  assert re.search(message, stderr.strip().splitlines()[-1])
  assert "Traceback" not in stderr
  assert not (tmp_path / "study").exists()


def test_dry_run_lists_the_plan(tmp_path):
  # The trainers on the CPU (on a GPU box too: its slots are the next test's).
  result = _sweep(tmp_path / "study", "--space=optimizer.learning_rate=loguniform(1e-4,3e-2)",
                  "--trials=5", "--workers=2", "--dry_run", env={"JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "tpe search, 5 trials, pruner median" in result.stdout
  assert "2 worker(s): CPU cores" in result.stdout
  assert "--config.dataset.eval_split=train[90%:]" in result.stdout
  assert not (tmp_path / "study").exists()


def test_on_a_gpu_node_the_command_gives_each_worker_its_own_gpus(tmp_path):
  """The study process keeps JAX on the CPU for itself; its workers' slots come from the
  trainers' environment: on a 4-GPU node (JAX on CUDA), 2 GPUs each."""
  result = _sweep(tmp_path / "study", "--space=optimizer.learning_rate=loguniform(1e-4,3e-2)",
                  "--trials=4", "--workers=2", "--dry_run",
                  env={"JAX_PLATFORMS": "cuda", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "2 worker(s): GPU 0,1; GPU 2,3." in result.stdout, result.stdout


def test_the_command_reads_its_flags_once_and_hands_them_on(tmp_path, monkeypatch):
  """Behind the entry point no function reads absl's global FLAGS or sys.argv: two studies
  planned in one process from flags of their own, with a sys.argv that says neither."""
  from absl import flags

  from launch import sweep

  monkeypatch.setattr(sys, "argv", ["launch.sweep", "--trials=99"])
  plans, options = [], []
  for trials in ("3", "4"):
    defined = flags.FlagValues()
    sweep._define_flags(defined)
    extra = sweep.parse_command_line(
        ["launch.sweep", f"--config={SMOKE}", f"--workdir={tmp_path / 'study'}",
         "--space=seed=int(0,9)", f"--trials={trials}", "--", "--config.num_epochs=1"],
        defined)[1:]
    options.append(sweep.read_options(defined))
    plans.append(sweep.make_plan(options[-1], extra))
    defined(["launch.sweep", "--trials=7"])  # a later parse: the options read stay as read
  assert [plan.trials for plan in plans] == [3, 4]
  assert [found.trials for found in options] == [3, 4]
  assert plans[0].fixed[-1] == "--config.num_epochs=1" and plans[0].search == "tpe"
  assert "trials" not in flags.FLAGS  # importing the command defines no global flag
  assert not (tmp_path / "study").exists()


def test_slurm_refuses_without_sbatch(tmp_path):
  result = _sweep(tmp_path / "study", "--sweep=seed=0,1", "--launcher=slurm", "--array=2",
                  env={"PATH": os.path.dirname(sys.executable)})
  assert result.returncode == 2
  assert "needs SLURM's `sbatch`, which is not on PATH" in result.stderr
  assert not (tmp_path / "study").exists()


def test_array_script_refuses_outside_a_job():
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "study_array.sbatch")],
                          cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")})
  assert result.returncode == 2
  assert "submit it through the study's command" in result.stderr


def test_slurm_array_tasks_are_workers_of_one_study(tmp_path):
  """The command sets the study up and submits an array job; each array task (run here as
  SLURM would, with the variables sbatch sets) is a worker that finishes it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "sbatch.log"
  (bin_dir / "sbatch").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {log}\n"
                                  "echo Submitted batch job 4242\n")
  (bin_dir / "sbatch").chmod(0o755)
  root = tmp_path / "study"
  # Chosen on the split it reports: the study is done once its trial is (no test evaluation).
  flags = ["--sweep=seed=0", "--pruner=none", "--test_split=train[90%:]", "--", *TINY]
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
  submitted = _sweep(root, "--launcher=slurm", "--array=2", "--sbatch_args=--time=0:10:00",
                     *flags, env=env)
  assert submitted.returncode == 0, submitted.stderr[-3000:]
  args = log.read_text().splitlines()
  script = args.index(os.path.join(REPO, "launch", "study_array.sbatch"))
  assert args[:script] == ["--array=0-1", "--job-name=study:study",
                           f"--output={root}/slurm-%A_%a.out", "--time=0:10:00"]
  assert args[script + 1:] == [f"--config={SMOKE}", f"--workdir={root}", *flags]
  assert (root / "study.journal").exists() and not (root / "trials").exists()

  task = subprocess.run(
      ["bash", args[script], *args[script + 1:]], cwd=tmp_path, capture_output=True, text=True,
      timeout=600, env={**os.environ, "SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242",
                        "SLURM_ARRAY_TASK_ID": "1", "SLURM_SUBMIT_DIR": REPO,
                        "PYTHON": sys.executable})
  assert task.returncode == 0, task.stderr[-3000:] + task.stdout[-3000:]
  assert "job 4242 task 1" in task.stderr
  assert "trial 0 (slot 0, all" in task.stdout
  rows = (root / "results.csv").read_text().splitlines()
  assert len(rows) == 2 and ",complete," in rows[1]
  info = json.loads((root / "trials" / "trial-0000" / "run.json").read_text())
  assert info["status"] == "finished"


def test_workers_get_devices_of_their_own(monkeypatch):
  from research.studies import study_trial

  monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # JAX runs on the GPUs...
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # ... of a 4-GPU node: whole GPUs each
  slots = study_trial.device_slots(2)
  assert [slot.env["CUDA_VISIBLE_DEVICES"] for slot in slots] == ["0,1", "2,3"]
  assert [slot.cpus for slot in slots] == [(), ()]
  assert [s.env["CUDA_VISIBLE_DEVICES"] for s in study_trial.device_slots(4)] == [
      "0", "1", "2", "3"]
  with pytest.raises(UserError, match="--workers=5 needs a GPU each, but this machine shows 4"):
    study_trial.device_slots(5)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # GPUs listed, but JAX on the CPU: cores each
  assert study_trial.device_slots(2)[0].env.get("CUDA_VISIBLE_DEVICES") is None
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: a share of the cores each
  cores = sorted(os.sched_getaffinity(0))
  slots = study_trial.device_slots(len(cores))
  assert [slot.cpus for slot in slots] == [(core,) for core in cores]
  assert all(slot.env["OMP_NUM_THREADS"] == "1" for slot in slots)
  assert study_trial.device_slots(1)[0].cpus == ()  # one worker: the whole machine
  with pytest.raises(UserError, match="needs a CPU core each"):
    study_trial.device_slots(len(cores) + 1)
