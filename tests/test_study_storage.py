"""A study's storage: a damaged journal keeps the study, storage refusals in one line, and
workers in separate processes sampling distinct, reproducible points (no training here)."""

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from research.errors import UserError
from research.studies import search_space, study, study_storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/default.py:smoke"


def _plan(root, search="random", trials=4, seed=3, heartbeat=30.0, name="s", storage=""):
  params = search_space.parse("optimizer.learning_rate=loguniform(1e-4,1e-2);"
                              "batch_size=choice(32,64)")
  return study.Plan(root=str(root), config_file=SMOKE, params=tuple(params), search=search,
                    trials=trials, sampler_seed=seed, pruner="median", storage=storage,
                    study_name=name, fixed=(), train_split="train[:90%]",
                    select_split="train[90%:]", test_split="test", objective="accuracy",
                    heartbeat_seconds=heartbeat)


def _states(plan) -> list[tuple[int, str, int]]:
  opened = study.Study(plan)
  return [(t.number, t.state.name, t.user_attrs.get(study.SLOT_ATTR)) for t in opened.optuna.trials]


# ---- A damaged journal -------------------------------------------------------------------------

@pytest.fixture
def journal_study(tmp_path):
  """A study of 4 trials: trial 0 complete, trial 1 running (its worker gone), 2 and 3
  waiting; its journal file."""
  plan = _plan(tmp_path, heartbeat=0.2)
  opened = study.Study(plan)
  first = opened.claim()
  study._suggest(first, plan.params[0])
  first.report(0.5, 1)
  first.study.tell(first, 0.5)
  second = opened.claim()
  study._suggest(second, plan.params[0])
  second.report(0.4, 1)
  return plan, tmp_path / study.JOURNAL_FILE


def _damaged(caplog, path) -> list[dict]:
  """The records set aside, each named in a warning with its file and byte offset."""
  side = [json.loads(line) for line in open(str(path) + ".damaged")]
  for entry in side:
    assert f"{path}: the record at byte {entry['offset']}" in caplog.text
  return side


def _resumes(plan, path):
  """The study goes on: the interrupted trial 1 (stale heartbeat) is retried in its own slot
  (so in its workdir, from its checkpoint), the finished one stays finished, and every new
  record is readable by a fresh reader."""
  time.sleep(0.8)
  opened = study.Study(plan)
  assert opened.heartbeat.fail_stale(opened.optuna) == [1]
  numbers = []
  while (trial := opened.claim()) is not None:
    study._suggest(trial, plan.params[0])
    trial.study.tell(trial, 0.1)
    numbers.append((trial.number, trial.user_attrs[study.SLOT_ATTR]))
  assert sorted(slot for _, slot in numbers) == [1, 2, 3], numbers
  states = _states(plan)
  assert states[0] == (0, "COMPLETE", 0)
  assert sorted(slot for _, state, slot in states if state == "COMPLETE") == [0, 1, 2, 3]
  assert study.Study(plan).optuna.trials[0].value == 0.5


def test_random_bytes_appended_to_the_journal(journal_study, caplog):
  plan, path = journal_study
  size = os.path.getsize(path)
  noise = lambda size: os.urandom(size).replace(b"\n", b"\xfe")  # no line break of its own
  garbage = noise(300) + b"\n" + noise(40) + b"\n{\"x\": 1"
  with open(path, "ab") as f:
    f.write(garbage)
  with caplog.at_level(logging.WARNING):
    assert [s for _, s, _ in _states(plan)] == ["COMPLETE", "RUNNING", "WAITING", "WAITING"]
    _resumes(plan, path)
  side = _damaged(caplog, path)
  assert [entry["offset"] for entry in side] == [size, size + 301, size + 342]
  assert base64.b64decode(side[0]["bytes_base64"]) == garbage[:301]
  assert open(path, "rb").read()[size:size + len(garbage)] == garbage  # never deleted


def test_a_journal_truncated_mid_record(journal_study, caplog):
  plan, path = journal_study
  data = open(path, "rb").read()
  last = data.rstrip(b"\n").rfind(b"\n") + 1  # trial 1's last record: its intermediate value
  with open(path, "wb") as f:
    f.write(data[:last + (len(data) - last) // 2])
  with caplog.at_level(logging.WARNING):
    opened = study.Study(plan)
    assert opened.optuna.trials[1].intermediate_values == {}  # the half record is not read
    _resumes(plan, path)
  assert [entry["offset"] for entry in _damaged(caplog, path)] == [last]


@pytest.mark.parametrize("record", ["intermediate_value", "create_trial"])
def test_a_record_damaged_in_the_middle_of_the_journal(journal_study, caplog, record):
  plan, path = journal_study
  lines = open(path, "rb").read().splitlines(keepends=True)
  op_code = {"intermediate_value": b'{"op_code":7,', "create_trial": b'{"op_code":4,'}[record]
  # Trial 0's evaluation, or trial 3's creation: a record with others after it.
  index = max(i for i, line in enumerate(lines[:-4]) if line.startswith(op_code))
  offset = sum(len(line) for line in lines[:index])
  middle = len(lines[index]) // 2
  lines[index] = lines[index][:middle] + b"\xff\xfe\x00garbage" + lines[index][middle + 10:]
  with open(path, "wb") as f:
    f.write(b"".join(lines))
  with caplog.at_level(logging.WARNING):
    states = _states(plan)
    assert states[:2] == [(0, "COMPLETE", 0), (1, "RUNNING", 1)]
    if record == "create_trial":  # the trial stands as failed, saying why; numbers kept
      assert states[3][1] == "FAIL"
      assert study.Study(plan).optuna.trials[3].user_attrs["failure"].startswith("its record")
    else:
      assert study.Study(plan).optuna.trials[0].intermediate_values == {}
      _resumes(plan, path)
  assert [entry["offset"] for entry in _damaged(caplog, path)] == [offset]


# ---- Storage refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("storage, message", [
    ("mongodb://x/y", "--storage=mongodb://x/y: 'mongodb' is not a kind of database storage "
                      "known here. Accepted: postgresql://"),
    ("mysql://u@h/db", "the mysql driver 'MySQLdb' is not installed: `pip install mysqlclient`"),
    ("mysql+pymysql://u@h/db", "driver 'pymysql' is not installed: `pip install PyMySQL`"),
    ("not a url://", "is not a database URL"),
])
def test_a_storage_url_of_an_unknown_kind_or_without_its_driver(storage, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")) as error:
    study_storage.database_url(storage)
  assert "\n" not in str(error.value)


def test_a_bare_postgresql_url_uses_the_installed_driver():
  assert study_storage.database_url("postgresql://u@h/db").drivername == "postgresql+psycopg2"


def _sweep(root, *flags):
  command = [sys.executable, "-m", "launch.sweep", f"--config={SMOKE}", f"--workdir={root}",
             "--sweep=seed=0", *flags]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_an_unreachable_database_is_one_line_and_writes_nothing(tmp_path):
  result = _sweep(tmp_path / "study", "--storage=postgresql://someone:secret@127.0.0.1:9/studies")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      "error: --storage=postgresql://someone:***@127.0.0.1:9/studies: cannot open the study "
      'database at 127.0.0.1:9: connection to server at "127.0.0.1", port 9 failed: Connection '
      "refused Is the server running on that host and accepting TCP/IP connections. Check that "
      "the server runs and that the user may log in to that database."]
  assert not (tmp_path / "study").exists()


# ---- Workers in separate processes ---------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, sys, time
    from research.studies import search_space, study
    plan = study.Plan(**{**json.loads(sys.argv[1]),
                         "params": tuple(search_space.parse(json.loads(sys.argv[1])["params"]))})
    opened = study.Study(plan)
    while (trial := opened.claim()) is not None:
      values = {p.key: study._suggest(trial, p) for p in plan.params}
      print(json.dumps([trial.number, values]), flush=True)
      time.sleep(0.3)  # a trial's training: the other worker claims meanwhile
      trial.study.tell(trial, values["optimizer.learning_rate"])
""")


def _two_worker_processes(plan) -> dict:
  """Two processes, each a worker of the study (as on two machines or two array tasks)."""
  os.makedirs(plan.root)
  study.Study(plan)  # the creator enqueues the trials
  fields = {k: getattr(plan, k) for k in plan.__dataclass_fields__}
  fields["params"] = ";".join(p.describe() for p in plan.params)
  workers = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(fields)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO}) for _ in range(2)]
  sampled = {}
  for worker in workers:
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0
    for line in output.splitlines():
      number, values = json.loads(line)
      sampled[number] = values
  assert len(sampled) == plan.trials
  return sampled


def _one_worker_here(plan) -> dict:
  """The same study again, all its trials claimed by one worker in this process."""
  os.makedirs(plan.root)
  opened = study.Study(plan)
  sampled = {}
  while (trial := opened.claim()) is not None:
    sampled[trial.number] = {p.key: study._suggest(trial, p) for p in plan.params}
    trial.study.tell(trial, sampled[trial.number]["optimizer.learning_rate"])
  return sampled


@pytest.mark.parametrize("search", ["random", "tpe"])
def test_worker_processes_sample_distinct_points_reproducibly(tmp_path, search):
  sampled = _two_worker_processes(_plan(tmp_path / "first", search=search, trials=4))
  rates = [values["optimizer.learning_rate"] for values in sampled.values()]
  assert len(set(rates)) == 4, sampled
  # Whoever claims a trial number, wherever: the points depend on the seed and the number
  # (one worker here: two more processes cost 5 CPU-seconds of imports).
  again = _one_worker_here(_plan(tmp_path / "again", search=search, trials=4))
  # The same --sampler_seed: the same point for each trial number (TPE's trials after its
  # two random start-up trials also depend on which trials had finished when they began).
  same = range(4) if search == "random" else range(2)
  assert [again[n] for n in same] == [sampled[n] for n in same]
  assert study.trial_seed(3, 0) != study.trial_seed(4, 0) != study.trial_seed(3, 1)
