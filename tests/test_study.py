"""Studies end to end: a real embedded study (journal file) with pruning, a failure, the
chosen trial's test evaluation, a rerun and a damaged journal; claims, samplers and heartbeats
without training; a real PostgreSQL server with concurrent workers and a refused login.
Interrupted studies (a worker killed, a study stopped) are test_study_interruptions.py's."""

import csv
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from research.studies import search_space, study, study_results
from test_sweep import run_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/default.py:smoke"
# Every trainer of the study tests runs 10 steps between two stops (log, evaluation, end) at
# most: the rows of its one compiled train loop, which is then the same program in every
# test with the same learning rate (JAX's compilation cache, tests/conftest.py), as are the
# evaluations of train[90%:] and of test.
LOG = "--config.log_every_steps=10"
# Long enough that the worker (polling every second) sees the first evaluation of a hopeless
# trial while its trainer still runs, on an idle machine too.
TINY = ["--config.num_train_steps=300", "--config.eval_every_steps=100", LOG]


def _sweep_command(root, *flags):
  return [sys.executable, "-m", "launch.sweep", f"--config={SMOKE}", f"--workdir={root}", *flags]


def _sweep(root, *flags):
  return subprocess.run(_sweep_command(root, *flags), cwd=REPO, capture_output=True, text=True,
                        timeout=900)


# ---- A real embedded study -------------------------------------------------------------------

# A grid in order, with ASHA: a good learning rate (the recipe's own, whose programs the
# other tests' trials share: a learning rate is compiled in), then a hopeless one (pruned at
# its first rung: worse than the first trial there), then one whose loss explodes (failed,
# with why).
EMBEDDED = ["--sweep=optimizer.learning_rate=1e-3,1e-6,1e30", "--pruner=asha", "--", *TINY]


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


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config parse
def test_rerunning_a_finished_study_runs_and_tests_nothing_again(embedded_study, monkeypatch,
                                                                 capsys):
  root, _ = embedded_study
  before = (root / "results.csv").read_text()
  result = _sweep(root, *EMBEDDED)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "-> " not in result.stdout  # no trial started
  assert "evaluating it on test" not in result.stdout
  assert (root / "results.csv").read_text() == before
  assert len((root / "trials" / "trial-0000" / "eval.jsonl").read_text().splitlines()) == 1
  # Another space under the same folder is refused, naming the difference (in this process,
  # through the command's own parser and main: the rerun above is the real program).
  status, _, stderr = run_in_process(
      [f"--config={SMOKE}", f"--workdir={root}", "--sweep=optimizer.learning_rate=3e-3,1e-5",
       "--", *TINY], monkeypatch, capsys)
  assert status == 2
  assert "was started with other settings (space:" in stderr


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
