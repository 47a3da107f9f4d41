"""Studies end to end: a real embedded study (journal file), a real PostgreSQL server with
concurrent workers, a worker killed mid-trial, pruning, failures and resume."""

import csv
import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from research.studies import search_space, study, study_results
from research.studies.study_trial import Slot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/default.py:smoke"
# Long enough that the worker (polling every second) sees the first evaluation of a hopeless
# trial while its trainer still runs, on an idle machine too.
TINY = ["--config.num_train_steps=300", "--config.eval_every_steps=100",
        "--config.log_every_steps=50", "--config.eval_batch_size=1000"]


def _sweep_command(root, *flags):
  return [sys.executable, "-m", "launch.sweep", f"--config={SMOKE}", f"--workdir={root}", *flags]


def _sweep(root, *flags):
  return subprocess.run(_sweep_command(root, *flags), cwd=REPO, capture_output=True, text=True,
                        timeout=900)


# ---- A real embedded study -------------------------------------------------------------------

# A grid in order, with ASHA: a good learning rate, then a hopeless one (pruned at its first
# rung: worse than the first trial there), then one whose loss explodes (failed, with why).
EMBEDDED = ["--sweep=optimizer.learning_rate=3e-3,1e-6,1e30", "--pruner=asha", "--", *TINY]


@pytest.fixture(scope="module")
def embedded_study(tmp_path_factory):
  root = tmp_path_factory.mktemp("studies") / "embedded"
  result = _sweep(root, *EMBEDDED)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return root, result


def test_embedded_study_end_to_end(embedded_study):
  root, result = embedded_study
  rows = list(csv.DictReader(open(root / "results.csv")))
  assert [(row["trial"], row["state"]) for row in rows] == [
      ("0", "complete"), ("1", "pruned"), ("2", "fail")]
  best, pruned, failed = rows
  # Every number names its split; only the chosen trial has a test number.
  assert float(best["accuracy (train[90%:])"]) > float(pruned["accuracy (train[90%:])"])
  assert float(best["test accuracy (test)"]) > 0.3
  assert pruned["test accuracy (test)"] == failed["test accuracy (test)"] == ""
  assert "Training stopped: the loss (nan)" in failed["reason"] and "non-finite" in failed["reason"]
  assert "trial 2 (slot 2" in result.stdout and "fail" in result.stdout
  # Trials trained on train[:90%] and were chosen on train[90%:]; the test split was read once.
  config = json.load(open(root / "trials" / "trial-0000" / "config.json"))
  assert config["dataset"]["train_split"] == "train[:90%]"
  assert config["dataset"]["eval_split"] == "train[90%:]"
  evaluations = (root / "trials" / "trial-0000" / "eval.jsonl").read_text().splitlines()
  assert len(evaluations) == 1 and json.loads(evaluations[0])["split"] == "test"
  assert json.loads(evaluations[0])["num_examples"] == 10000
  # The pruned trial stopped early, through its trainer's checkpoint-and-exit.
  assert "trial 1 (slot 1" in result.stdout and ": pruned at evaluation 1," in result.stdout
  import optuna

  pruned_trial = optuna.load_study(study_name="embedded", storage=optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(str(root / "study.journal")))).trials[1]
  assert pruned_trial.user_attrs["pruned_at_evaluation"] == 1
  info = json.load(open(root / "trials" / "trial-0001" / "run.json"))
  assert info["status"] == "preempted" and info["sessions"][-1]["end_step"] < 300
  assert glob.glob(str(root / "trials" / "trial-0001" / "checkpoints" / "*"))
  table = (root / "results.md").read_text()
  assert "best first by accuracy on train[90%:] (trials train on train[:90%])" in table
  assert "Chosen: trial 0, evaluated once on test: accuracy" in table
  for picture in ("results_curves.png", "optimization_history.png"):
    assert os.path.getsize(root / picture) > 10_000, picture
  # TensorBoard's HParams dashboard: one session per finished trial, with its parameters.
  sessions = sorted(os.listdir(root / "hparams"))
  assert [s for s in sessions if s.startswith("trial-")] == ["trial-0000", "trial-0001"]
  events = b"".join(path.read_bytes() for path in (root / "hparams" / "trial-0000").iterdir())
  assert b"_hparams_/session_start_info" in events and b"optimizer.learning_rate" in events


def test_rerunning_a_finished_study_runs_and_tests_nothing_again(embedded_study):
  root, _ = embedded_study
  before = (root / "results.csv").read_text()
  result = _sweep(root, *EMBEDDED)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "-> " not in result.stdout  # no trial started
  assert "evaluating it on test" not in result.stdout
  assert (root / "results.csv").read_text() == before
  assert len((root / "trials" / "trial-0000" / "eval.jsonl").read_text().splitlines()) == 1
  # Another space under the same folder is refused, naming the difference.
  other = _sweep(root, "--sweep=optimizer.learning_rate=3e-3,1e-5", "--", *TINY)
  assert other.returncode == 2
  assert "was started with other settings (space:" in other.stderr


def test_a_finished_study_with_a_damaged_journal_tail_keeps_its_results(embedded_study,
                                                                          tmp_path):
  """Garbage after the last record (a crash or a full disk): every later command warns,
  names the file and the offset, and uses the rest: nothing runs again, nothing is lost."""
  source, _ = embedded_study
  root = tmp_path / "embedded"
  shutil.copytree(source, root)
  journal = root / "study.journal"
  size = journal.stat().st_size
  with open(journal, "ab") as f:
    f.write(b"\x00\xff\xfe torn record" + os.urandom(64).replace(b"\n", b"-"))
  before = (root / "results.csv").read_text()
  result = _sweep(root, *EMBEDDED)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{journal}: the record at byte {size} (" in result.stderr
  assert "-> " not in result.stdout and "Traceback" not in result.stderr
  assert (root / "results.csv").read_text() == before
  assert json.loads((root / "study.journal.damaged").read_text())["offset"] == size


# ---- Claims, samplers and heartbeats, without training --------------------------------------

def _plan(root, storage="", search="tpe", trials=6, heartbeat=30.0, name="s"):
  params = search_space.parse("optimizer.learning_rate=loguniform(1e-4,1e-2);"
                              "batch_size=choice(32,64);num_epochs=int(1,3)")
  return study.Plan(root=str(root), config_file=SMOKE, params=tuple(params), search=search,
                    trials=trials, sampler_seed=3, pruner="median", storage=storage,
                    study_name=name, fixed=(), train_split="train[:90%]",
                    select_split="train[90%:]", test_split="test", objective="accuracy",
                    heartbeat_seconds=heartbeat)


def _claim_all_concurrently(plan, workers=3) -> list:
  """Each worker (own Study object, as in its own process) claims trials until none is left,
  suggesting parameters and telling a value the way a trial would."""
  claimed = []

  def worker():
    opened = study.Study(plan)
    while (trial := opened.claim()) is not None:
      values = {p.key: study._suggest(trial, p) for p in plan.params}
      claimed.append((trial.number, trial.user_attrs[study.SLOT_ATTR], values))
      opened.optuna.tell(trial, values["optimizer.learning_rate"] * 10)

  study.Study(plan)  # the creator enqueues the trials
  threads = [threading.Thread(target=worker) for _ in range(workers)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return claimed


def test_concurrent_workers_claim_each_trial_once_on_a_journal(tmp_path):
  plan = _plan(tmp_path)
  claimed = _claim_all_concurrently(plan)
  assert sorted(number for number, _, _ in claimed) == list(range(6))
  assert sorted(slot for _, slot, _ in claimed) == list(range(6))
  for _, _, values in claimed:
    assert 1e-4 <= values["optimizer.learning_rate"] <= 1e-2
    assert values["batch_size"] in ("32", "64") and values["num_epochs"] in (1, 2, 3)
  opened = study.Study(plan)
  assert len(opened.optuna.trials) == 6  # nothing beyond the study's N trials
  study_results._write_optuna_plots(opened)  # Optuna's own plots of the finished trials
  for picture in ("optimization_history.png", "param_importances.png"):
    assert os.path.getsize(tmp_path / picture) > 10_000, picture


def test_a_trial_whose_heartbeat_stops_is_retried_in_its_own_workdir(tmp_path):
  plan = _plan(tmp_path, trials=2, heartbeat=0.2)
  dead = study.Study(plan)
  trial = dead.claim()  # ... and its worker dies: no heartbeat ever
  dead.heartbeat.beat(dead.storage.get_trial_id_from_study_id_trial_number(dead.study_id, 0))
  time.sleep(0.8)
  alive = study.Study(plan)
  assert alive.heartbeat.fail_stale(alive.optuna) == [trial.number]
  assert alive.heartbeat.fail_stale(alive.optuna) == []  # once
  retry = [t for t in alive.optuna.trials if t.number == 2][0]
  assert retry.state.name == "WAITING" and retry.user_attrs[study.SLOT_ATTR] == 0
  assert retry.system_attrs["failed_trial"] == trial.number


# ---- A trial's state is what happened to it -------------------------------------------------

@pytest.mark.slow
def test_a_verdict_at_the_last_evaluation_leaves_a_finished_trial_complete(tmp_path):
  """A pruner that decides at the last evaluation, and a stop request at that moment: the
  trainer has finished training, so neither stops it; the trial is complete, not failed."""
  import optuna

  stop = threading.Event()

  class LastEvaluationPruner(optuna.pruners.BasePruner):
    def prune(self, study_, trial):
      if trial.last_step == 3:
        stop.set()  # the worker is told to stop too, after training ended
        return True
      return False

  plan = dataclasses.replace(
      _plan(tmp_path, search="grid", trials=1),
      params=tuple(search_space.parse("seed=0")), search="grid",
      fixed=(*study.split_flags("train[:90%]", "train[90%:]"), "--config.num_train_steps=60",
             "--config.eval_every_steps=20", "--config.log_every_steps=20",
             "--config.eval_batch_size=1000"), poll_seconds=0.2)
  opened = study.Study(plan)
  opened.optuna.pruner = LastEvaluationPruner()
  slot = Slot(0, {}, (), "all cores")
  assert opened.run_trial(opened.claim(), slot, stop, dict(os.environ)) == "complete"
  trial, = study.Study(plan).optuna.trials
  assert trial.state.name == "COMPLETE" and "failure" not in trial.user_attrs
  assert sorted(trial.intermediate_values) == [1, 2, 3]
  assert trial.value == trial.intermediate_values[3]
  info = json.load(open(tmp_path / "trials" / "trial-0000" / "run.json"))
  assert info["status"] == "finished" and info["sessions"][-1]["end_step"] == 60


# ---- PostgreSQL: a real server on 127.0.0.1 ---------------------------------------------------

def _postgres_bin() -> str | None:
  found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                 key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
  return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
  """A PostgreSQL server of its own in a temporary folder, stopped at the end. Postgres
  refuses to run as root: as root, the server runs as the `postgres` user."""
  bin_dir = _postgres_bin()
  if bin_dir is None:
    pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql "
                "package where it can: as root with apt-get)")
  as_user = []
  if os.geteuid() == 0:
    import pwd

    try:
      pwd.getpwnam("postgres")
    except KeyError:
      pytest.skip("running as root, and there is no `postgres` user to run the server as")
    as_user = ["runuser", "-u", "postgres", "--"]
  folder = tempfile.mkdtemp(prefix="study-postgres-")
  if as_user:
    shutil.chown(folder, "postgres", "postgres")
  data, port = os.path.join(folder, "data"), _free_port()

  def run(*command):
    subprocess.run([*as_user, *command], check=True, capture_output=True, text=True, timeout=120)

  run(f"{bin_dir}/initdb", "-D", data, "-U", "study", "--auth=trust", "-E", "UTF8")
  run(f"{bin_dir}/pg_ctl", "-D", data, "-l", os.path.join(folder, "server.log"), "-w", "start",
      "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200")
  try:
    run(f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "study", "studies")
    yield f"postgresql+psycopg2://study@127.0.0.1:{port}/studies"
  finally:
    run(f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def bare_postgres_url(postgres_url):
  """The server's URL in the form docs/studies.md shows: postgresql://, no driver named."""
  return postgres_url.replace("postgresql+psycopg2://", "postgresql://")


@pytest.mark.parametrize("search", ["tpe", "random"])
def test_concurrent_workers_claim_each_trial_once_on_postgres(tmp_path, bare_postgres_url,
                                                              search):
  plan = _plan(tmp_path, storage=bare_postgres_url, search=search, trials=8,
               name=f"claims-{search}")
  claimed = _claim_all_concurrently(plan, workers=4)
  assert sorted(number for number, _, _ in claimed) == list(range(8))
  assert len(study.Study(plan).optuna.trials) == 8


def test_a_refused_login_is_one_line_naming_the_server_and_its_reason(tmp_path,
                                                                     bare_postgres_url):
  refused = bare_postgres_url.replace("//study@", "//nobody@")
  result = _sweep(tmp_path / "study", f"--storage={refused}", "--sweep=seed=0")
  assert result.returncode == 2, result.stderr[-2000:]
  line, = result.stderr.strip().splitlines()
  port = bare_postgres_url.split(":")[-1].split("/")[0]
  assert line.startswith(f"error: --storage={refused}: cannot open the study database at "
                         f"127.0.0.1:{port}: "), line
  assert 'role "nobody" does not exist' in line, line
  assert not (tmp_path / "study").exists()


def _wait_for(condition, process, timeout=300):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, process.communicate()[0][-3000:]
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.2)


@pytest.mark.slow
def test_two_workers_on_postgres_one_killed_mid_trial(tmp_path, postgres_url):
  """Two workers share a study on PostgreSQL. One is killed (SIGKILL) mid-trial: its trainer
  checkpoints and exits (it dies with its worker), the other worker notices the silent
  heartbeat, and the trial resumes from its checkpoint; every trial runs once."""
  root = tmp_path / "shared"
  # Trials long enough that the kill, at the first checkpoint, lands well inside trial 0.
  flags = [f"--storage={postgres_url}", "--sweep=seed=0,1,2", "--pruner=none",
           "--heartbeat=1", "--", "--config.num_train_steps=120", "--config.eval_every_steps=40",
           "--config.log_every_steps=5", "--config.checkpoint_every_steps=5",
           "--config.eval_batch_size=1000"]
  first = subprocess.Popen(_sweep_command(root, *flags), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  _wait_for(lambda: os.path.isdir(root / "trials" / "trial-0000"), first)  # it claimed trial 0
  second = subprocess.Popen(_sweep_command(root, *flags), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

  _wait_for(lambda: glob.glob(str(root / "trials" / "trial-0000" / "checkpoints" / "*")), first)
  first.kill()  # SIGKILL: no chance to tell the study anything
  first.wait()
  output, _ = second.communicate(timeout=900)
  assert second.returncode == 0, output[-4000:]

  import optuna

  loaded = optuna.load_study(study_name="shared", storage=postgres_url)
  states = sorted((t.user_attrs["slot"], t.state.name) for t in loaded.trials)
  complete = [slot for slot, state in states if state == "COMPLETE"]
  assert sorted(complete) == [0, 1, 2], states  # every trial's result arrived, once
  failed = [t for t in loaded.trials if t.state.name == "FAIL"]
  assert len(failed) == 1, states  # the killed worker's trial, failed by its silent heartbeat
  sessions = {}
  for workdir in sorted(glob.glob(str(root / "trials" / "trial-*"))):
    info = json.load(open(os.path.join(workdir, "run.json")))
    assert info["status"] == "finished"
    sessions[os.path.basename(workdir)] = info["sessions"]
  resumed = [name for name, s in sessions.items() if len(s) > 1]
  assert len(resumed) == len(failed), sessions
  for name in resumed:  # resumed from its checkpoint, not started over
    assert sessions[name][1]["start_step"] > 0, sessions[name]
    assert sessions[name][1]["start_step"] == sessions[name][0]["end_step"]
  for name, s in sessions.items():
    if name not in resumed:
      assert len(s) == 1 and s[0]["start_step"] == 0
  rows = list(csv.DictReader(open(root / "results.csv")))
  assert len(rows) == 3 and {row["state"] for row in rows} == {"complete"}
  assert sum(int(row["retries"]) for row in rows) == len(failed)
  assert "Chosen: trial" in (root / "results.md").read_text()


@pytest.mark.slow
def test_a_stopped_study_resumes_its_interrupted_trial_from_the_checkpoint(tmp_path):
  root = tmp_path / "stopped"
  flags = ["--sweep=seed=0,1", "--pruner=none", "--", "--config.num_train_steps=60",
           "--config.eval_every_steps=20", "--config.log_every_steps=5",
           "--config.checkpoint_every_steps=5"]
  first = subprocess.Popen(_sweep_command(root, *flags), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  _wait_for(lambda: glob.glob(str(root / "trials" / "trial-0000" / "checkpoints" / "*")), first)
  first.send_signal(signal.SIGTERM)
  output, _ = first.communicate(timeout=300)
  assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
  assert "interrupted" in output and "run the same command to resume" in output
  second = _sweep(root, *flags)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  info = json.load(open(root / "trials" / "trial-0000" / "run.json"))
  sessions = [(s["status"], s["start_step"], s["end_step"]) for s in info["sessions"]]
  assert sessions[0][0] == "preempted" and sessions[1] == ("finished", sessions[0][2], 60)
  rows = list(csv.DictReader(open(root / "results.csv")))
  assert sorted((row["workdir"], row["state"], row["retries"]) for row in rows) == [
      ("trials/trial-0000", "complete", "1"), ("trials/trial-0001", "complete", "0")]
